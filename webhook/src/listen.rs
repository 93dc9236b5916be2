//! TCP listeners that serve both address families from one socket.
//!
//! The defaults are `[::]:PORT` so that one manifest serves IPv4, dual-stack and IPv6-only EKS
//! clusters: an IPv6 socket with `IPV6_V6ONLY` off also accepts IPv4 clients (as IPv4-mapped
//! addresses). A host without IPv6 at all (`ipv6.disable=1`) cannot create that socket; there the
//! unspecified IPv6 address falls back to `0.0.0.0` with the same port, so an IPv4-only node keeps
//! working with the same flags.

use socket2::{Domain, Protocol, Socket, Type};
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use tokio::net::TcpListener;

/// Connections the kernel queues before `accept`; the API server opens few, but bursts of pod
/// creations at a rollout arrive together.
const BACKLOG: i32 = 1024;

/// Binds `addr` for accepting connections. `[::]` (the unspecified IPv6 address) listens on
/// both families, or on `0.0.0.0` when the host has no IPv6; any other address is bound as
/// given. Returns the listener and the address it really listens on.
pub fn bind(addr: SocketAddr) -> io::Result<(TcpListener, SocketAddr)> {
    match bind_exactly(addr) {
        Ok(listener) => {
            let local = listener.local_addr()?;
            Ok((listener, local))
        }
        Err(error) => match ipv4_fallback(addr, &error) {
            Some(fallback) => {
                tracing::warn!(
                    %addr, %fallback, %error,
                    "this host has no IPv6: listening on IPv4 only"
                );
                let listener = bind_exactly(fallback)?;
                let local = listener.local_addr()?;
                Ok((listener, local))
            }
            None => Err(error),
        },
    }
}

/// Where to listen instead when binding `addr` failed with `error`: `0.0.0.0` on the same port,
/// only for the unspecified IPv6 address and only when the error says the host has no IPv6
/// (never for a port in use or a permission error, which `0.0.0.0` would hide).
pub fn ipv4_fallback(addr: SocketAddr, error: &io::Error) -> Option<SocketAddr> {
    let SocketAddr::V6(v6) = addr else {
        return None;
    };
    if !v6.ip().is_unspecified() {
        return None;
    }
    // EAFNOSUPPORT: the kernel was booted without IPv6; EADDRNOTAVAIL: IPv6 is there but
    // disabled on every interface (net.ipv6.conf.all.disable_ipv6=1).
    let no_ipv6 = matches!(error.raw_os_error(), Some(EAFNOSUPPORT | EADDRNOTAVAIL));
    no_ipv6.then(|| SocketAddr::from((Ipv4Addr::UNSPECIFIED, addr.port())))
}

/// `EAFNOSUPPORT` on Linux (the only platform the images are built for).
const EAFNOSUPPORT: i32 = 97;
/// `EADDRNOTAVAIL` on Linux.
const EADDRNOTAVAIL: i32 = 99;

/// One non-blocking listening socket on exactly `addr`; an IPv6 socket accepts IPv4 too.
fn bind_exactly(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        // Explicitly, rather than trusting net.ipv6.bindv6only (0 by default, but a host may
        // set it): with it on, `[::]` would silently stop answering IPv4 API servers.
        socket.set_only_v6(false)?;
    }
    // A restarted webhook rebinds at once although connections of the old process linger.
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    TcpListener::from_std(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv6Addr, SocketAddrV6};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    fn no_ipv6() -> io::Error {
        io::Error::from_raw_os_error(EAFNOSUPPORT)
    }

    #[test]
    fn only_the_unspecified_ipv6_address_falls_back_and_only_without_ipv6() {
        let any6: SocketAddr = "[::]:8443".parse().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            ipv4_fallback(any6, &no_ipv6()),
            Some("0.0.0.0:8443".parse().unwrap_or_else(|e| panic!("{e}")))
        );
        assert_eq!(
            ipv4_fallback(any6, &io::Error::from_raw_os_error(EADDRNOTAVAIL)),
            Some("0.0.0.0:8443".parse().unwrap_or_else(|e| panic!("{e}")))
        );
        // A port in use is an error to report, not a reason to listen elsewhere.
        assert_eq!(
            ipv4_fallback(any6, &io::Error::from(io::ErrorKind::AddrInUse)),
            None
        );
        // An address the operator chose is bound as given or not at all.
        let loopback6 = SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::LOCALHOST, 8443, 0, 0));
        assert_eq!(ipv4_fallback(loopback6, &no_ipv6()), None);
        let any4: SocketAddr = "0.0.0.0:8443".parse().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ipv4_fallback(any4, &no_ipv6()), None);
    }

    async fn echo_once(listener: TcpListener) {
        if let Ok((mut stream, _)) = listener.accept().await {
            let mut byte = [0u8; 1];
            if stream.read_exact(&mut byte).await.is_ok() {
                let _ = stream.write_all(&byte).await;
            }
        }
    }

    async fn round_trip(to: SocketAddr) -> io::Result<u8> {
        let mut stream = TcpStream::connect(to).await?;
        stream.write_all(b"x").await?;
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await?;
        Ok(byte[0])
    }

    fn host_has_ipv6_loopback() -> bool {
        std::net::TcpListener::bind("[::1]:0").is_ok()
    }

    #[tokio::test]
    async fn the_unspecified_ipv6_address_answers_both_families() {
        let (listener, local) = bind("[::]:0".parse().unwrap_or_else(|e| panic!("{e}")))
            .unwrap_or_else(|e| panic!("{e}"));
        let port = local.port();
        if !host_has_ipv6_loopback() {
            // The fallback: IPv4 only, on the same port.
            assert_eq!(local, SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)));
            tokio::spawn(echo_once(listener));
            let v4 = round_trip(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).await;
            assert_eq!(v4.ok(), Some(b'x'));
            return;
        }
        assert!(local.is_ipv6(), "{local}");
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut byte = [0u8; 1];
                if stream.read_exact(&mut byte).await.is_ok() {
                    let _ = stream.write_all(&byte).await;
                }
            }
        });
        let v4 = round_trip(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).await;
        assert_eq!(v4.ok(), Some(b'x'), "IPv4 client on [::]:{port}");
        let v6 = round_trip(SocketAddr::from((Ipv6Addr::LOCALHOST, port))).await;
        assert_eq!(v6.ok(), Some(b'x'), "IPv6 client on [::]:{port}");
    }

    #[tokio::test]
    async fn an_ipv4_address_is_bound_as_given() {
        let (listener, local) = bind("127.0.0.1:0".parse().unwrap_or_else(|e| panic!("{e}")))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(local.is_ipv4());
        tokio::spawn(echo_once(listener));
        assert_eq!(round_trip(local).await.ok(), Some(b'x'));
    }

    #[test]
    fn a_port_in_use_is_an_error() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
        let addr = taken.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("{e}"));
        let _guard = runtime.enter();
        assert!(bind(addr).is_err());
    }
}
