//! The opcode session's state machine: which frame is allowed when, and for which role.
//!
//! Pure: it sees decoded frames and answers with the [`Step`] the connection must take or
//! the [`Violation`] it must close for. Time is the connection's business (it owns the
//! IDENTIFY and heartbeat deadlines).

use serde_json::value::RawValue;
use std::borrow::Cow;

use super::frame::{IdentifyType, Inbound};
use crate::auth::Role;
use crate::frontend::CloseCode;

/// What the connection must do for an accepted frame.
#[derive(Debug)]
pub enum Step<'a> {
    /// Send HEARTBEAT_ACK and push the heartbeat deadline back.
    Ack,
    /// Redeem the token for this role; on success call [`Session::identified`] and send READY.
    Identify {
        token: Option<Cow<'a, str>>,
        role: Role,
    },
    /// Publish a reading (producers only).
    Submit { t: Cow<'a, str>, d: &'a RawValue },
    /// Replay stored readings (consumers only).
    Replay { after: u64, before: Option<u64> },
}

/// A frame that ends the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    #[error("frame before IDENTIFY")]
    NotIdentified,
    #[error("second IDENTIFY")]
    AlreadyIdentified,
    #[error("opcode {0} is not one a client sends")]
    UnknownOpcode(u64),
    #[error("opcode {op} is not allowed for a {role}")]
    WrongRole { op: u64, role: &'static str },
}

impl Violation {
    pub fn close_code(self) -> CloseCode {
        match self {
            Violation::NotIdentified => CloseCode::IdentifyExpected,
            Violation::AlreadyIdentified => CloseCode::AlreadyIdentified,
            Violation::UnknownOpcode(_) | Violation::WrongRole { .. } => CloseCode::UnknownOpcode,
        }
    }
}

/// One connection's protocol state.
#[derive(Debug, Default)]
pub struct Session {
    role: Option<Role>,
}

impl Session {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn role(&self) -> Option<Role> {
        self.role
    }

    /// Records a successful IDENTIFY.
    pub fn identified(&mut self, role: Role) {
        self.role = Some(role);
    }

    /// Decides what a decoded frame means in the current state.
    pub fn step<'a>(&self, frame: Inbound<'a>) -> Result<Step<'a>, Violation> {
        match (frame, self.role) {
            (Inbound::Heartbeat, _) => Ok(Step::Ack),
            (Inbound::Identify { .. }, Some(_)) => Err(Violation::AlreadyIdentified),
            (Inbound::Identify { token, kind }, None) => Ok(Step::Identify {
                token,
                role: match kind {
                    IdentifyType::User => Role::User,
                    IdentifyType::Developer => Role::Developer,
                },
            }),
            (_, None) => Err(Violation::NotIdentified),
            (Inbound::Submit { t, d }, Some(Role::User)) => Ok(Step::Submit { t, d }),
            (Inbound::Submit { .. }, Some(role)) => Err(Violation::WrongRole {
                op: 6,
                role: role.as_str(),
            }),
            (Inbound::Replay { after, before }, Some(Role::Developer)) => {
                Ok(Step::Replay { after, before })
            }
            (Inbound::Replay { .. }, Some(role)) => Err(Violation::WrongRole {
                op: 7,
                role: role.as_str(),
            }),
            (Inbound::Other(op), Some(_)) => Err(Violation::UnknownOpcode(op)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(s: &Session, text: &str) -> Result<CloseOr, CloseCode> {
        let frame = Inbound::decode(text).expect("valid frame");
        s.step(frame)
            .map(|st| match st {
                Step::Ack => CloseOr::Ack,
                Step::Identify { role, .. } => CloseOr::Identify(role),
                Step::Submit { .. } => CloseOr::Submit,
                Step::Replay { .. } => CloseOr::Replay,
            })
            .map_err(Violation::close_code)
    }

    #[derive(Debug, PartialEq)]
    enum CloseOr {
        Ack,
        Identify(Role),
        Submit,
        Replay,
    }

    const SUBMIT: &str = r#"{"op":6,"t":"STEPS","d":{"val":1}}"#;
    const REPLAY: &str = r#"{"op":7,"d":{"after":1}}"#;

    #[test]
    fn before_identify_only_heartbeat_and_identify() {
        let s = Session::new();
        assert_eq!(step(&s, r#"{"op":0}"#), Ok(CloseOr::Ack));
        assert_eq!(
            step(&s, r#"{"op":3,"d":{"token":"t","type":0}}"#),
            Ok(CloseOr::Identify(Role::User))
        );
        assert_eq!(
            step(&s, r#"{"op":3,"d":{"token":"t","type":1}}"#),
            Ok(CloseOr::Identify(Role::Developer))
        );
        assert_eq!(step(&s, SUBMIT), Err(CloseCode::IdentifyExpected));
        assert_eq!(step(&s, REPLAY), Err(CloseCode::IdentifyExpected));
        assert_eq!(step(&s, r#"{"op":42}"#), Err(CloseCode::IdentifyExpected));
    }

    #[test]
    fn producers_submit_and_consumers_replay() {
        let mut producer = Session::new();
        producer.identified(Role::User);
        assert_eq!(step(&producer, SUBMIT), Ok(CloseOr::Submit));
        assert_eq!(step(&producer, REPLAY), Err(CloseCode::UnknownOpcode));
        let mut consumer = Session::new();
        consumer.identified(Role::Developer);
        assert_eq!(step(&consumer, REPLAY), Ok(CloseOr::Replay));
        assert_eq!(step(&consumer, SUBMIT), Err(CloseCode::UnknownOpcode));
        assert_eq!(step(&consumer, r#"{"op":0}"#), Ok(CloseOr::Ack));
    }

    #[test]
    fn identified_sessions_refuse_identify_and_server_opcodes() {
        let mut s = Session::new();
        s.identified(Role::User);
        assert_eq!(s.role(), Some(Role::User));
        assert_eq!(
            step(&s, r#"{"op":3,"d":{"token":"t","type":0}}"#),
            Err(CloseCode::AlreadyIdentified)
        );
        for op in [1, 2, 4, 5, 8, 99] {
            assert_eq!(
                step(&s, &format!(r#"{{"op":{op}}}"#)),
                Err(CloseCode::UnknownOpcode),
                "op {op}"
            );
        }
    }
}
