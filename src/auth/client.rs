//! Who is on the other end of a user-facing call: IP, user agent, device fingerprint, and
//! the device they add up to. The `api` layer fills [`ClientInfo`] from `ClientContext` or
//! metadata; this module parses it.

use std::{net::IpAddr, sync::LazyLock};

use crate::store::DeviceInfo;

/// The end user's context for one request, already extracted by the `api` layer.
#[derive(Debug, Clone, Default)]
pub struct ClientInfo {
    pub ip: Option<IpAddr>,
    pub user_agent: String,
    pub fingerprint: String,
}

/// User-agent strings are attacker-controlled: keep what we store bounded.
const MAX_USER_AGENT: usize = 512;
const MAX_FINGERPRINT: usize = 128;

static PARSER: LazyLock<woothee::parser::Parser> = LazyLock::new(woothee::parser::Parser::new);

impl ClientInfo {
    /// Device type, browser and OS parsed from the user agent (woothee, the Rust port of the
    /// project-neutral woothee dataset).
    pub fn device(&self) -> DeviceInfo {
        let user_agent: String = truncate(&self.user_agent, MAX_USER_AGENT);
        let (device_type, browser, os) = match PARSER.parse(&user_agent) {
            Some(ua) => {
                let known = |s: &str| {
                    if s == woothee::woothee::VALUE_UNKNOWN { String::new() } else { s.to_string() }
                };
                let device_type = match ua.category {
                    "pc" => "desktop",
                    "smartphone"
                        if ua.os == "iPad" || (ua.os == "Android" && !user_agent.contains("Mobile")) =>
                    {
                        "tablet"
                    }
                    "smartphone" | "mobilephone" => "mobile",
                    "crawler" => "crawler",
                    _ => "unknown",
                };
                let browser = match (known(ua.name), ua.version) {
                    (name, _) if name.is_empty() => String::new(),
                    (name, v) if v.is_empty() || v == woothee::woothee::VALUE_UNKNOWN => name,
                    (name, v) => format!("{name} {}", v.split('.').next().unwrap_or(v)),
                };
                (device_type.to_string(), browser, known(ua.os))
            }
            None => ("unknown".to_string(), String::new(), String::new()),
        };
        DeviceInfo {
            device_type,
            browser,
            os,
            user_agent,
            ip_address: self.ip.map(|ip| ip.to_string()).unwrap_or_default(),
            fingerprint: truncate(&self.fingerprint, MAX_FINGERPRINT),
        }
    }
}

fn truncate(s: &str, max_chars: usize) -> String {
    s.chars().filter(|c| !c.is_control()).take(max_chars).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(ua: &str) -> DeviceInfo {
        ClientInfo {
            ip: Some("203.0.113.9".parse().unwrap()),
            user_agent: ua.into(),
            fingerprint: "fp".into(),
        }
        .device()
    }

    #[test]
    fn parses_common_user_agents() {
        let chrome = device(
            "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36",
        );
        assert_eq!((chrome.device_type.as_str(), chrome.browser.as_str()), ("desktop", "Chrome 120"));
        assert!(chrome.os.starts_with("Windows"), "{}", chrome.os);
        assert_eq!(chrome.ip_address, "203.0.113.9");

        let iphone = device(
            "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.1 Mobile/15E148 Safari/604.1",
        );
        assert_eq!((iphone.device_type.as_str(), iphone.os.as_str()), ("mobile", "iPhone"));

        let ipad = device(
            "Mozilla/5.0 (iPad; CPU OS 16_0 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/16.0 Mobile/15E148 Safari/604.1",
        );
        assert_eq!(ipad.device_type, "tablet");

        let bot = device("Googlebot/2.1 (+http://www.google.com/bot.html)");
        assert_eq!(bot.device_type, "crawler");
    }

    #[test]
    fn unknown_and_hostile_agents_are_bounded() {
        let d = device(&format!("x\u{0000}{}", "y".repeat(10_000)));
        assert_eq!(d.device_type, "unknown");
        assert_eq!(d.user_agent.chars().count(), MAX_USER_AGENT);
        assert!(!d.user_agent.contains('\u{0000}'));
        assert_eq!(device("").device_type, "unknown");
    }
}
