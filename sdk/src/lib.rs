//! The XCluster client SDK: picks a backend per request type from the balancers' weighted server lists and
//! connects to it directly.
