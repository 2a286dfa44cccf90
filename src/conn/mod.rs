//! Bounds on what a client connection may hold, one concern a file: how
//! many there are ([`slots`]), how long one may leave sent bytes unread
//! ([`io`]), how long an HTTP/2 one may sit idle ([`h2`]), the shape of
//! the answers hyper writes on its own ([`errors`]), and the open-file
//! limit they all draw on ([`fd`]).

mod errors;
mod fd;
mod h2;
mod io;
mod slots;

pub use fd::raise_fd_limit;
pub use h2::{Activity, Tracked};
pub use io::GuardedIo;
pub use slots::{refusal, Slot, Slots};
