//! NetManager library.
