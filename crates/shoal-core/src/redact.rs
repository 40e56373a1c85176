//! URLs fit to print: a password in a URL's user information
//! (`postgres://shoal:secret@db/registry`, `redis://:secret@cache:6379`)
//! never reaches a log line, an error or `/ready`.

/// `url` without its password (the user name stays).
pub fn redact_url(url: &str) -> String {
    match (url.split_once("://"), url.rfind('@')) {
        (Some((scheme, rest)), Some(_)) => {
            let (creds, host) = rest.rsplit_once('@').unwrap_or(("", rest));
            let user = creds.split(':').next().unwrap_or("");
            format!("{scheme}://{user}@{host}")
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_dropped_and_the_rest_kept() {
        assert_eq!(
            redact_url("postgres://shoal:secret@db:5432/registry"),
            "postgres://shoal@db:5432/registry"
        );
        assert_eq!(
            redact_url("redis://:secret@cache:6379/2"),
            "redis://@cache:6379/2"
        );
        assert_eq!(
            redact_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
        assert_eq!(redact_url("not a url"), "not a url");
    }
}
