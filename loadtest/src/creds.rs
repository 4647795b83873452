//! Developer credentials: gathers `(id, api_key)` pairs from `--dev`,
//! `--dev-id/--api-key`, a sensorgate `--config` file and a server
//! `--data-dir` (demo-developer.toml), in that order, without duplicates.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

/// One developer the run can mint tokens for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Developer {
    pub id: String,
    pub api_key: String,
}

/// Where credentials may come from (the CLI's credential options).
#[derive(Default)]
pub struct Sources<'a> {
    pub devs: &'a [String],
    pub dev_id: Option<&'a str>,
    pub api_key: Option<&'a str>,
    pub config: Option<&'a Path>,
    pub data_dir: Option<&'a Path>,
}

impl Sources<'_> {
    /// Whether any credential source was given.
    pub fn any(&self) -> bool {
        !self.devs.is_empty()
            || self.dev_id.is_some()
            || self.config.is_some()
            || self.data_dir.is_some()
    }
}

/// All developers named by the sources, first occurrence of an id winning.
pub fn collect(src: &Sources<'_>) -> Result<Vec<Developer>> {
    let mut out: Vec<Developer> = Vec::new();
    let mut push = |d: Developer| {
        if !out.iter().any(|o| o.id == d.id) {
            out.push(d);
        }
    };
    for spec in src.devs {
        push(parse_dev_spec(spec)?);
    }
    match (src.dev_id, src.api_key) {
        (Some(id), Some(key)) => push(Developer {
            id: id.to_string(),
            api_key: key.to_string(),
        }),
        (None, None) => {}
        _ => bail!("--dev-id and --api-key must be given together"),
    }
    if let Some(path) = src.config {
        for d in from_config(path)? {
            push(d);
        }
    }
    if let Some(dir) = src.data_dir {
        push(from_data_dir(dir)?);
    }
    if out.is_empty() {
        bail!(
            "no developer credentials: pass --dev ID:KEY, --dev-id/--api-key, \
             --config FILE or --data-dir DIR"
        );
    }
    Ok(out)
}

/// Parses `ID:KEY` (the key may itself contain ':').
pub fn parse_dev_spec(spec: &str) -> Result<Developer> {
    match spec.split_once(':') {
        Some((id, key)) if !id.is_empty() && !key.is_empty() => Ok(Developer {
            id: id.to_string(),
            api_key: key.to_string(),
        }),
        _ => bail!("--dev {spec:?}: expected ID:KEY"),
    }
}

#[derive(Deserialize)]
struct DevEntry {
    id: Option<String>,
    api_key: Option<String>,
}

/// Every `[[developers]]` entry with both `id` and `api_key` in a sensorgate
/// config file; other keys and tables are ignored.
pub fn from_config(path: &Path) -> Result<Vec<Developer>> {
    #[derive(Deserialize)]
    struct ConfigFile {
        #[serde(default)]
        developers: Vec<DevEntry>,
    }
    let text = read(path)?;
    let cfg: ConfigFile =
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let devs: Vec<Developer> = cfg
        .developers
        .into_iter()
        .filter_map(|e| match (e.id, e.api_key) {
            (Some(id), Some(api_key)) => Some(Developer { id, api_key }),
            _ => None,
        })
        .collect();
    if devs.is_empty() {
        bail!(
            "{}: no [[developers]] entry with both id and api_key",
            path.display()
        );
    }
    Ok(devs)
}

/// The demo developer a server writes to `<data_dir>/demo-developer.toml`.
pub fn from_data_dir(dir: &Path) -> Result<Developer> {
    let path: PathBuf = dir.join("demo-developer.toml");
    let entry: DevEntry =
        toml::from_str(&read(&path)?).with_context(|| format!("parsing {}", path.display()))?;
    match (entry.id, entry.api_key) {
        (Some(id), Some(api_key)) => Ok(Developer { id, api_key }),
        _ => bail!("{}: needs both id and api_key", path.display()),
    }
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "sensorgate-load-test-{name}-{}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn dev_spec() {
        assert_eq!(
            parse_dev_spec("acme:k:e:y").unwrap(),
            Developer {
                id: "acme".into(),
                api_key: "k:e:y".into()
            }
        );
        assert!(parse_dev_spec("acme").is_err());
        assert!(parse_dev_spec(":key").is_err());
        assert!(parse_dev_spec("id:").is_err());
    }

    #[test]
    fn config_file_ignores_other_keys() {
        let dir = temp_dir("config");
        let path = dir.join("sensorgate.toml");
        std::fs::write(
            &path,
            r#"
listen = "127.0.0.1:8080"
data_dir = "/var/lib/sensorgate"
[limits]
max_frame = 4096

[[developers]]
id = "acme"
api_key = "k1"
max_consumers = 2

[[developers]]
id = "nokey"

[[developers]]
id = "globex"
api_key = "k2"
"#,
        )
        .unwrap();
        let devs = from_config(&path).unwrap();
        assert_eq!(
            devs.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(),
            ["acme", "globex"]
        );
        std::fs::write(&path, "listen = \"x\"\n").unwrap();
        assert!(from_config(&path).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn data_dir_and_merge_order() {
        let dir = temp_dir("data");
        std::fs::write(
            dir.join("demo-developer.toml"),
            "id = \"demo\"\napi_key = \"secret\"\n",
        )
        .unwrap();
        let devs_arg = vec!["demo:override".to_string(), "b:kb".to_string()];
        let devs = collect(&Sources {
            devs: &devs_arg,
            dev_id: Some("c"),
            api_key: Some("kc"),
            data_dir: Some(&dir),
            ..Sources::default()
        })
        .unwrap();
        let ids: Vec<_> = devs
            .iter()
            .map(|d| (d.id.as_str(), d.api_key.as_str()))
            .collect();
        assert_eq!(ids, [("demo", "override"), ("b", "kb"), ("c", "kc")]);
        assert_eq!(from_data_dir(&dir).unwrap().api_key, "secret");
        std::fs::remove_dir_all(dir).unwrap();
        assert!(collect(&Sources::default()).is_err());
    }
}
