//! Values settings are written in: sizes with units, and allowed browser origins.

use serde::Deserialize;

/// A size in bytes: a plain number, or with a unit (`64MiB`, `4 KiB`, `1GB`; KiB/MiB/GiB are
/// powers of 1024, KB/MB/GB of 1000).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn get(self) -> u64 {
        self.0
    }

    pub fn get_usize(self) -> usize {
        usize::try_from(self.0).unwrap_or(usize::MAX)
    }
}

impl std::str::FromStr for ByteSize {
    type Err = String;

    fn from_str(text: &str) -> Result<ByteSize, String> {
        let text = text.trim();
        let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
        let (digits, unit) = text.split_at(split);
        let number: u64 = digits
            .parse()
            .map_err(|_| format!("{text:?} is not a size; expected e.g. 1048576, 64MiB or 4KiB"))?;
        let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kib" => 1 << 10,
            "m" | "mib" => 1 << 20,
            "g" | "gib" => 1 << 30,
            "kb" => 1_000,
            "mb" => 1_000_000,
            "gb" => 1_000_000_000,
            _ => {
                return Err(format!(
                    "{text:?} has an unknown unit; use B, KiB, MiB, GiB, KB, MB or GB"
                ));
            }
        };
        number
            .checked_mul(multiplier)
            .map(ByteSize)
            .ok_or_else(|| format!("{text:?} is too large"))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<ByteSize, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Number(number) => Ok(ByteSize(number)),
            Raw::Text(text) => text.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// Which browser origins may call the API and open sockets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowedOrigins {
    pub any: bool,
    pub loopback: bool,
    /// Serialized origins (`scheme://host[:port]`, default port omitted).
    pub exact: Vec<String>,
}

impl AllowedOrigins {
    pub fn any() -> AllowedOrigins {
        AllowedOrigins {
            any: true,
            ..AllowedOrigins::default()
        }
    }

    pub fn loopback() -> AllowedOrigins {
        AllowedOrigins {
            loopback: true,
            ..AllowedOrigins::default()
        }
    }

    /// `*`, or a comma-separated list of origins and the word `loopback`.
    pub fn parse(list: &str) -> Result<AllowedOrigins, String> {
        let mut allowed = AllowedOrigins::default();
        for item in list.split(',').map(str::trim).filter(|item| !item.is_empty()) {
            match item {
                "*" => allowed.any = true,
                "loopback" => allowed.loopback = true,
                origin => allowed.exact.push(normalize_origin(origin).ok_or_else(|| {
                    format!("{origin:?} is not an origin; expected e.g. https://app.example or http://localhost:3000, loopback or *")
                })?),
            }
        }
        Ok(allowed)
    }

    /// May a request carrying this `Origin` header proceed?
    pub fn allows(&self, origin: &str) -> bool {
        if self.any {
            return true;
        }
        let Some(normalized) = normalize_origin(origin) else {
            return false;
        };
        if self.exact.contains(&normalized) {
            return true;
        }
        self.loopback && is_loopback_origin(&normalized)
    }
}

/// `scheme://host[:port]` of an http(s) origin, as browsers send it; `None` for anything else
/// (including `null`, paths and credentials).
fn normalize_origin(text: &str) -> Option<String> {
    let parsed = url::Url::parse(text).ok()?;
    let plain = matches!(parsed.scheme(), "http" | "https")
        && parsed.host().is_some()
        && parsed.username().is_empty()
        && parsed.password().is_none()
        && parsed.path() == "/"
        && parsed.query().is_none()
        && parsed.fragment().is_none();
    plain.then(|| parsed.origin().ascii_serialization())
}

fn is_loopback_origin(origin: &str) -> bool {
    let Ok(parsed) = url::Url::parse(origin) else {
        return false;
    };
    match parsed.host() {
        Some(url::Host::Domain(domain)) => domain.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}
