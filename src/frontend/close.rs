//! Every WebSocket close code the server sends, with its reason text and what a client
//! should do on receiving it. Integration tests assert these exact codes.

/// A close the server initiates. `code()` and `reason()` go on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseCode {
    /// 1000: answer to the client's own close. Client: nothing to do.
    Normal,
    /// 1001: the server is shutting down. Client: reconnect with jittered backoff (another
    /// node or the restarted one), then REPLAY from the last seq processed.
    GoingAway,
    /// 1002: a WebSocket protocol violation (bad framing). Client bug: do not retry-loop.
    Protocol,
    /// 1007: the payload is not valid JSON or not a frame of this protocol. Client bug.
    InvalidJson,
    /// 1009: a message larger than `max_frame_bytes`. Client bug: send smaller readings.
    TooLarge,
    /// 1011: the server failed (store error). Client: reconnect with backoff.
    Internal,
    /// 4000: something other than HEARTBEAT or IDENTIFY before IDENTIFY, or no IDENTIFY
    /// within `identify_timeout_ms`. Client bug: IDENTIFY right after HELLO.
    IdentifyExpected,
    /// 4001: the token is invalid, expired, redeemed already, or for the other type. Client:
    /// mint a fresh token (tokens are single-use), then reconnect.
    BadToken,
    /// 4002: a newer connection replaced this one (same user, or the developer's consumer
    /// limit). Client: do not reconnect blindly, or the two will evict each other.
    Duplicate,
    /// 4003: a second IDENTIFY on an identified connection. Client bug.
    AlreadyIdentified,
    /// 4004: an unknown opcode, or one the role may not send (SUBMIT from a consumer, REPLAY
    /// from a producer). Client bug.
    UnknownOpcode,
    /// 4005: no HEARTBEAT within interval × 1.25 + grace. Client: reconnect, and heartbeat
    /// on the HELLO interval.
    HeartbeatMissed,
    /// 4008: too many frames (SUBMIT rate limit, or replies left unread). Client: slow
    /// down, reconnect after a pause.
    RateLimited,
    /// 4009: the client read nothing for `consumer_stall_timeout_ms` while data waited
    /// (or a live-topic subscriber's queue stayed full). A consumer that reads slowly is
    /// not closed: it falls behind and catches up from the log. Client: reconnect and
    /// REPLAY from the last seq processed; nothing is lost, the stream is durable.
    TooSlow,
    /// 4010: a consumer catching up from the log fell behind retention: readings it had not
    /// been sent were removed. Client: what it missed is gone from the stream; resync from
    /// the system of record, then reconnect and REPLAY `after: 0` (what is still kept).
    BehindRetention,
}

impl CloseCode {
    pub const ALL: [CloseCode; 15] = [
        CloseCode::Normal,
        CloseCode::GoingAway,
        CloseCode::Protocol,
        CloseCode::InvalidJson,
        CloseCode::TooLarge,
        CloseCode::Internal,
        CloseCode::IdentifyExpected,
        CloseCode::BadToken,
        CloseCode::Duplicate,
        CloseCode::AlreadyIdentified,
        CloseCode::UnknownOpcode,
        CloseCode::HeartbeatMissed,
        CloseCode::RateLimited,
        CloseCode::TooSlow,
        CloseCode::BehindRetention,
    ];

    pub fn code(self) -> u16 {
        match self {
            CloseCode::Normal => 1000,
            CloseCode::GoingAway => 1001,
            CloseCode::Protocol => 1002,
            CloseCode::InvalidJson => 1007,
            CloseCode::TooLarge => 1009,
            CloseCode::Internal => 1011,
            CloseCode::IdentifyExpected => 4000,
            CloseCode::BadToken => 4001,
            CloseCode::Duplicate => 4002,
            CloseCode::AlreadyIdentified => 4003,
            CloseCode::UnknownOpcode => 4004,
            CloseCode::HeartbeatMissed => 4005,
            CloseCode::RateLimited => 4008,
            CloseCode::TooSlow => 4009,
            CloseCode::BehindRetention => 4010,
        }
    }

    /// The reason text; the seed's own wording where the seed names the code.
    pub fn reason(self) -> &'static str {
        match self {
            CloseCode::Normal => "Normal closure",
            CloseCode::GoingAway => "Server is shutting down",
            CloseCode::Protocol => "WebSocket protocol error",
            CloseCode::InvalidJson => "Invalid or unrecognised JSON data was provided",
            CloseCode::TooLarge => "Frame too large",
            CloseCode::Internal => "Internal server error",
            CloseCode::IdentifyExpected => "IDENTIFY payload expected but was not received",
            CloseCode::BadToken => "Improper token was passed for IDENTIFY",
            CloseCode::Duplicate => "Duplicate connection opened",
            CloseCode::AlreadyIdentified => "Multiple IDENTIFY payloads received",
            CloseCode::UnknownOpcode => "Unrecognised opcode was received",
            CloseCode::HeartbeatMissed => "Heartbeat missed",
            CloseCode::RateLimited => "Rate limited",
            CloseCode::TooSlow => "Consumer too slow",
            CloseCode::BehindRetention => "Consumer fell behind retention",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_distinct_and_counted_in_metrics() {
        let mut codes: Vec<u16> = CloseCode::ALL.iter().map(|c| c.code()).collect();
        codes.sort();
        codes.dedup();
        assert_eq!(codes.len(), CloseCode::ALL.len());
        for c in CloseCode::ALL {
            assert!(crate::metrics::CLOSE_CODES.contains(&c.code()), "{c:?}");
            // A close frame's reason must fit in a control frame (125 bytes with the code).
            assert!(c.reason().len() <= 123);
        }
    }
}
