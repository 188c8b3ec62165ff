//! NodeEngine library.
