//! SLA and API model types shared by root and cluster.
