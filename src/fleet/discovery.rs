//! Turning configured hosts into addresses, again and again: a Kubernetes
//! headless Service answers with one address per ready pod, so the answer
//! is the fleet.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::pin::Pin;

/// Resolves a host name to its addresses. The proxy uses the system's
/// resolver; tests hand in their own, so nothing touches real DNS.
pub trait Resolve: Send + Sync + 'static {
    fn resolve<'a>(
        &'a self,
        host: &'a str,
    ) -> Pin<Box<dyn Future<Output = io::Result<Vec<IpAddr>>> + Send + 'a>>;
}

/// The system's resolver (`getaddrinfo`, through tokio's blocking pool),
/// which follows `/etc/resolv.conf`'s search list as a pod expects.
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve<'a>(
        &'a self,
        host: &'a str,
    ) -> Pin<Box<dyn Future<Output = io::Result<Vec<IpAddr>>> + Send + 'a>> {
        Box::pin(async move {
            let addrs = tokio::net::lookup_host((host, 0)).await?;
            Ok(addrs.map(|a| a.ip()).collect())
        })
    }
}

/// Whether `upstream` is one of the proxy's own listening sockets, so
/// that sending to it would come straight back in. A listener on the
/// unspecified address takes every local address, which a bind test
/// recognises without listing interfaces.
pub fn is_own_address(upstream: SocketAddr, own: &[SocketAddr]) -> bool {
    let upstream = SocketAddr::new(upstream.ip().to_canonical(), upstream.port());
    own.iter().any(|o| {
        let o = SocketAddr::new(o.ip().to_canonical(), o.port());
        o.port() == upstream.port()
            && (o.ip() == upstream.ip()
                // Connecting to 0.0.0.0 reaches this host.
                || upstream.ip().is_unspecified()
                || (o.ip().is_unspecified() && is_local(upstream.ip())))
    })
}

fn is_local(ip: IpAddr) -> bool {
    ip.is_loopback() || ip.is_unspecified() || UdpSocket::bind((ip, 0)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_addresses() {
        let own: Vec<SocketAddr> = vec!["127.0.0.1:8000".parse().unwrap()];
        assert!(is_own_address("127.0.0.1:8000".parse().unwrap(), &own));
        assert!(!is_own_address("127.0.0.1:8100".parse().unwrap(), &own));
        assert!(!is_own_address("127.0.0.2:8000".parse().unwrap(), &own));
        assert!(is_own_address("0.0.0.0:8000".parse().unwrap(), &own));
        assert!(is_own_address(
            "[::ffff:127.0.0.1]:8000".parse().unwrap(),
            &own
        ));
        let any: Vec<SocketAddr> = vec!["0.0.0.0:8000".parse().unwrap()];
        assert!(is_own_address("127.0.0.1:8000".parse().unwrap(), &any));
        assert!(is_own_address("127.0.0.9:8000".parse().unwrap(), &any));
        // TEST-NET-3: no host has it.
        assert!(!is_own_address("203.0.113.7:8000".parse().unwrap(), &any));
    }
}
