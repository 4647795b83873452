//! Which destinations exist: names under the configured prefixes (broker prefixes for
//! topics, application prefixes for the server's services), a developer's stream as a
//! topic, and the bounds every destination must keep. Shared by STOMP frames and the HTTP
//! publish API, so both refuse the same names with the same words.

/// `/topic/streams/{developer-id}`: a developer's sensor stream, readable by that developer
/// alone and written only by its producers on `/connect`.
pub const STREAMS: &str = "/topic/streams/";
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
    #[error("streams are written by their producers on /connect")]
    ReadOnly,
}

/// A destination under one of `prefixes`, bounded, with no empty, `.` or `..` segments.
pub fn check<P: AsRef<str>>(d: &str, prefixes: &[P]) -> Result<(), DestinationError> {
    if d.len() > MAX_DESTINATION {
        return Err(DestinationError::TooLong);
    }
    let Some(rest) = prefixes.iter().find_map(|p| d.strip_prefix(p.as_ref())) else {
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
        let check = |d: &str| check(d, &["/topic/", "/v1/topic/"]);
        assert_eq!(check("/topic/workout/record"), Ok(()));
        assert_eq!(check("/v1/topic/conversation/42"), Ok(()));
        assert_eq!(
            check("/topic/../../etc/passwd"),
            Err(DestinationError::Invalid)
        );
        assert_eq!(check("/topic/a//b"), Err(DestinationError::Invalid));
        assert_eq!(check("/topic/./b"), Err(DestinationError::Invalid));
        assert_eq!(check("/topic/"), Err(DestinationError::Invalid));
        assert_eq!(check("/queue/a"), Err(DestinationError::Unknown));
        assert_eq!(check("/v1/app/x"), Err(DestinationError::Unknown));
        assert_eq!(
            check(&format!("/topic/{}", "a".repeat(300))),
            Err(DestinationError::TooLong)
        );
    }
}
