//! Integration tests of the simulator's MAX events over HTTP: membership and rights, long
//! polling, webhook delivery.

mod delivery;
mod helpers;
mod members;
mod updates;
