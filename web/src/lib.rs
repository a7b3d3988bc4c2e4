//! What the master's and the agent's HTTP ports share: HTTP Basic
//! authentication as Mesos's basic authenticator (`auth`), TLS with
//! reloadable certificates and client identities (`tls`), and the accept
//! loop that serves a router over either (`serve`).

pub mod auth;
pub mod serve;
pub mod tls;
