//! Micro-segmentation: a network-wide policy of allow/deny rules between
//! members selected by certificate identity (groups, attributes, names,
//! overlay addresses), compiled per node into an [`engine::Engine`] that the
//! data plane consults for each new flow, with connection tracking so that
//! replies and established flows pass without a rule walk.
//!
//! Sans-IO like the rest of this crate: bytes and time in, decisions out.

pub mod conntrack;
pub mod document;
pub mod engine;
pub mod packet;
pub mod policy;
