//! GGUF files (written by the gguf helper)
