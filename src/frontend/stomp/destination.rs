//! Which destinations exist: broker prefixes for topics anyone subscribed can receive,
//! and the bounds every destination must keep. Shared by STOMP frames and the HTTP publish
//! API, so both refuse the same names with the same words.

/// Destinations subscribers may use and publishers may send to.
pub const BROKER_PREFIXES: [&str; 2] = ["/topic/", "/v1/topic/"];
/// Longest destination accepted.
pub const MAX_DESTINATION: usize = 256;

/// Why a destination is refused; the text goes into the ERROR (or HTTP 400) with the name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DestinationError {
    #[error("destination too long")]
    TooLong,
    #[error("unknown destination")]
    Unknown,
    #[error("invalid destination")]
    Invalid,
}

/// A topic destination: under a broker prefix, bounded, no empty, `.` or `..` segments.
pub fn check(d: &str) -> Result<(), DestinationError> {
    if d.len() > MAX_DESTINATION {
        return Err(DestinationError::TooLong);
    }
    let Some(rest) = BROKER_PREFIXES.iter().find_map(|p| d.strip_prefix(p)) else {
        return Err(DestinationError::Unknown);
    };
    if rest.is_empty()
        || rest
            .split('/')
            .any(|s| s.is_empty() || s == "." || s == "..")
    {
        return Err(DestinationError::Invalid);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_are_checked() {
        assert_eq!(check("/topic/workout/record"), Ok(()));
        assert_eq!(check("/v1/topic/conversation/42"), Ok(()));
        assert_eq!(
            check("/topic/../../etc/passwd"),
            Err(DestinationError::Invalid)
        );
        assert_eq!(check("/topic/a//b"), Err(DestinationError::Invalid));
        assert_eq!(check("/topic/"), Err(DestinationError::Invalid));
        assert_eq!(check("/queue/a"), Err(DestinationError::Unknown));
        assert_eq!(
            check(&format!("/topic/{}", "a".repeat(300))),
            Err(DestinationError::TooLong)
        );
    }
}
