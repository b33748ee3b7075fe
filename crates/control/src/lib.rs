pub mod state;
pub mod webhook;
