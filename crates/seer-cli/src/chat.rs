//! `seer chat`: an interactive conversation about images. Line editing and history on a
//! terminal; one message per line when stdin is a pipe, so it can be scripted.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use rustyline::error::ReadlineError;
use seer::{FinishReason, Image, Message, Role};

use crate::backend::{openai_message, Backend, BackendArgs};

#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    backend: BackendArgs,
    /// A system message to start with (`\system` changes it).
    #[arg(long)]
    system: Option<String>,
}

const HELP: &str = "\
\\image PATH|URL  attach an image to the next message (repeat for several)
\\system TEXT     set the system message
\\clear           forget the conversation (the system message stays)
\\save FILE       write the conversation as JSON (OpenAI's message format)
\\help            this list
Ctrl-C stops an answer; Ctrl-D (or end of input) leaves.";

/// The conversation and what waits for the next message.
struct Session {
    system: Option<String>,
    turns: Vec<Message>,
    pending_images: Vec<String>,
}

impl Session {
    fn messages(&self) -> Vec<Message> {
        let system = self.system.iter().map(|s| Message::text(Role::System, s.clone()));
        system.chain(self.turns.iter().cloned()).collect()
    }
}

/// What a line asks for.
enum Command<'a> {
    Say(&'a str),
    Image(&'a str),
    System(&'a str),
    Clear,
    Save(&'a str),
    Help,
    Unknown(&'a str),
}

fn parse(line: &str) -> Command<'_> {
    let Some(rest) = line.strip_prefix('\\') else { return Command::Say(line) };
    let (name, arg) = rest.split_once(char::is_whitespace).map(|(n, a)| (n, a.trim())).unwrap_or((rest, ""));
    match name {
        "image" if !arg.is_empty() => Command::Image(arg),
        "system" => Command::System(arg),
        "clear" => Command::Clear,
        "save" if !arg.is_empty() => Command::Save(arg),
        "help" | "?" => Command::Help,
        _ => Command::Unknown(line),
    }
}

pub fn chat(args: ChatArgs) -> Result<()> {
    let backend = Backend::new(&args.backend)?;
    // Ctrl-C during an answer stops the answer, not seer.
    let interrupted = Arc::new(AtomicBool::new(false));
    let flag = interrupted.clone();
    ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst)).context("installing the Ctrl-C handler")?;
    let mut session = Session { system: args.system.clone(), turns: Vec::new(), pending_images: Vec::new() };
    let mut input = Input::new()?;
    if input.is_terminal() {
        eprintln!("seer chat: type a message, \\help for commands, Ctrl-D to leave.");
    }
    while let Some(line) = input.next_line()? {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        match parse(line) {
            Command::Say(text) => {
                interrupted.store(false, Ordering::SeqCst);
                respond(&backend, &args.backend, &mut session, text, &interrupted)?;
            }
            Command::Image(spec) => {
                session.pending_images.push(spec.to_string());
                eprintln!("[image {} attached to the next message]", session.pending_images.len());
            }
            Command::System(text) => session.system = (!text.is_empty()).then(|| text.to_string()),
            Command::Clear => {
                session.turns.clear();
                session.pending_images.clear();
                eprintln!("[conversation cleared]");
            }
            Command::Save(path) => match save(&session, &PathBuf::from(path)) {
                Ok(()) => eprintln!("[saved to {path}]"),
                Err(e) => eprintln!("error: {e:#}"),
            },
            Command::Help => eprintln!("{HELP}"),
            Command::Unknown(l) => eprintln!("unknown command `{l}`; \\help lists them"),
        }
    }
    Ok(())
}

/// Sends one user message with the attached images and streams the answer. A bad image
/// or a refused request is reported and the conversation goes on without that message.
fn respond(backend: &Backend, args: &BackendArgs, session: &mut Session, text: &str, interrupted: &AtomicBool) -> Result<()> {
    let images = session.pending_images.drain(..).map(|s| Image::from(s.as_str())).collect::<Vec<_>>();
    session.turns.push(seer::user(text, images));
    let stdout = std::io::stdout();
    let mut on_text = |piece: &str| {
        let mut out = stdout.lock();
        let written = out.write_all(piece.as_bytes()).and_then(|_| out.flush()).is_ok();
        written && !interrupted.load(Ordering::SeqCst)
    };
    match backend.answer(args, &session.messages(), None, &mut on_text) {
        Ok(answer) => {
            if answer.finish_reason == FinishReason::Cancelled {
                println!("\n[stopped]");
            } else {
                println!();
            }
            // A stopped answer stays in the conversation as far as it got.
            session.turns.push(Message::text(Role::Assistant, answer.text));
        }
        Err(e) => {
            session.turns.pop();
            eprintln!("error: {}", crate::one_line(&e));
        }
    }
    Ok(())
}

fn save(session: &Session, path: &PathBuf) -> Result<()> {
    let messages = session.messages().iter().map(openai_message).collect::<Result<Vec<_>>>()?;
    let json = serde_json::to_string_pretty(&messages)?;
    std::fs::write(path, json + "\n").with_context(|| format!("writing {}", path.display()))
}

/// Lines from a terminal (with editing and history) or from a pipe.
enum Input {
    Terminal(Box<rustyline::DefaultEditor>, Option<PathBuf>),
    Pipe(std::io::StdinLock<'static>),
}

impl Input {
    fn new() -> Result<Input> {
        if !std::io::stdin().is_terminal() {
            return Ok(Input::Pipe(std::io::stdin().lock()));
        }
        let mut editor = rustyline::DefaultEditor::new().context("starting the line editor")?;
        let history = history_file();
        if let Some(path) = &history {
            let _ = editor.load_history(path);
        }
        Ok(Input::Terminal(Box::new(editor), history))
    }

    fn is_terminal(&self) -> bool {
        matches!(self, Input::Terminal(..))
    }

    /// The next line, or `None` at the end.
    fn next_line(&mut self) -> Result<Option<String>> {
        match self {
            Input::Pipe(stdin) => {
                let mut line = String::new();
                Ok((stdin.read_line(&mut line)? > 0).then_some(line))
            }
            Input::Terminal(editor, history) => loop {
                match editor.readline("> ") {
                    Ok(line) => {
                        let _ = editor.add_history_entry(line.as_str());
                        if let Some(path) = history {
                            let _ = editor.save_history(path);
                        }
                        return Ok(Some(line));
                    }
                    // Ctrl-C at the prompt clears the line, as in a shell.
                    Err(ReadlineError::Interrupted) => continue,
                    Err(ReadlineError::Eof) => return Ok(None),
                    Err(e) => return Err(e.into()),
                }
            },
        }
    }
}

/// `$XDG_STATE_HOME/seer/chat_history`, or `~/.local/state/seer/chat_history`.
fn history_file() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_STATE_HOME").map(PathBuf::from).or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))?;
    let dir = base.join("seer");
    std::fs::create_dir_all(&dir).ok()?;
    Some(dir.join("chat_history"))
}
