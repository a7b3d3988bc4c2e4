//! A TCP relay on loopback between the agent and the master that a test (or
//! the soak) can
//! cut and heal: a partition of their link, as a dropped route would make
//! it. While cut, every byte either side sends is dropped (TCP stays up, so
//! only each side's own timers find the silence) and new connections are
//! accepted and dropped the same way; healing closes every connection made
//! before, so both sides start afresh.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

#[derive(Default)]
struct State {
    cut: AtomicBool,
    /// Bumped at each heal: connections of an older generation are closed.
    generation: AtomicU64,
}

pub struct LinkCut {
    state: Arc<State>,
}

impl LinkCut {
    /// Relays `127.0.0.1:listen` to `127.0.0.1:target`.
    pub fn start(listen: u16, target: u16) -> std::io::Result<LinkCut> {
        let listener = TcpListener::bind(("127.0.0.1", listen))?;
        let state = Arc::new(State::default());
        let shared = state.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                // Refused while the target is down: the client sees that.
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                    continue;
                };
                let (Ok(client_copy), Ok(server_copy)) = (client.try_clone(), server.try_clone())
                else {
                    continue;
                };
                let generation = shared.generation.load(Ordering::SeqCst);
                for (from, to) in [(client_copy, server_copy), (server, client)] {
                    let state = shared.clone();
                    std::thread::spawn(move || pump(from, to, &state, generation));
                }
            }
        });
        Ok(LinkCut { state })
    }

    pub fn cut(&self) {
        self.state.cut.store(true, Ordering::SeqCst);
    }

    pub fn heal(&self) {
        self.state.generation.fetch_add(1, Ordering::SeqCst);
        self.state.cut.store(false, Ordering::SeqCst);
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, state: &State, generation: u64) {
    if from
        .set_read_timeout(Some(Duration::from_millis(100)))
        .is_err()
    {
        return;
    }
    let mut buffer = vec![0u8; 64 << 10];
    loop {
        if state.generation.load(Ordering::SeqCst) != generation {
            break;
        }
        let read = match from.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(_) => break,
        };
        if state.cut.load(Ordering::SeqCst) {
            continue; // dropped on the cut link
        }
        if to.write_all(&buffer[..read]).is_err() {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}
