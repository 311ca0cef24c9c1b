//! A throwaway HTTP/1.1 server on 127.0.0.1 for fetch tests: one thread,
//! one request per connection, canned replies by path.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread;

#[derive(Clone)]
pub enum Reply {
    /// 200 with a Content-Length.
    Body(Vec<u8>),
    /// 200 with no Content-Length: the body ends when the connection closes.
    Streamed(Vec<u8>),
    /// 302 to this Location.
    Redirect(String),
    /// This status, empty body.
    Status(u16),
    /// Say nothing for this long, then hang up.
    Stall(std::time::Duration),
}

/// Start serving `routes`; unknown paths get 404. The thread lives as long as
/// the test process.
pub fn serve(routes: Vec<(&str, Reply)>) -> SocketAddr {
    let routes: HashMap<String, Reply> = routes
        .into_iter()
        .map(|(p, r)| (p.to_string(), r))
        .collect();
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            // A client that hangs up early is part of some tests.
            let _ = answer(stream, &routes);
        }
    });
    addr
}

fn answer(mut stream: TcpStream, routes: &HashMap<String, Reply>) -> std::io::Result<()> {
    let path = read_request_path(&stream)?;
    let reply = routes.get(&path).cloned().unwrap_or(Reply::Status(404));
    let (head, body) = match reply {
        Reply::Stall(pause) => {
            thread::sleep(pause);
            return Ok(());
        }
        Reply::Body(b) => (
            format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n", b.len()),
            b,
        ),
        Reply::Streamed(b) => ("HTTP/1.1 200 OK\r\n".to_string(), b),
        Reply::Redirect(to) => (
            format!("HTTP/1.1 302 Found\r\nLocation: {to}\r\nContent-Length: 0\r\n"),
            vec![],
        ),
        Reply::Status(code) => (
            format!("HTTP/1.1 {code} Nope\r\nContent-Length: 0\r\n"),
            vec![],
        ),
    };
    stream.write_all(format!("{head}Connection: close\r\n\r\n").as_bytes())?;
    stream.write_all(&body)?;
    stream.flush()
}

fn read_request_path(stream: &TcpStream) -> std::io::Result<String> {
    let mut reader = BufReader::new(stream);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header == "\r\n" {
            break;
        }
    }
    Ok(request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or("/")
        .to_string())
}
