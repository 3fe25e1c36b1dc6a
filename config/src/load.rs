//! Loading: built-in defaults → file → environment, then validation.

use std::path::{Path, PathBuf};

use crate::env::{ENV_MAP, Kind, env_name};
use crate::{ConfigError, DEFAULTS_TOML, Settings};

impl Settings {
    /// Load from the process environment (the normal entry point of every binary).
    pub fn load() -> Result<Self, ConfigError> {
        let file = match std::env::var_os("SWITCHBOARD_CONFIG") {
            Some(p) => Some(PathBuf::from(p)),
            None => {
                let p = Path::new("config/default.toml");
                p.exists().then(|| p.to_path_buf())
            }
        };
        Self::load_from(file.as_deref(), |name| std::env::var(name).ok())
    }

    /// Load with an explicit file and environment lookup (tests use this).
    pub fn load_from(
        file: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let mut table = parse_table(DEFAULTS_TOML, "(built-in defaults)")?;
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
                path: path.to_path_buf(),
                source,
            })?;
            let overlay = parse_table(&text, &path.display().to_string())?;
            merge(&mut table, overlay);
        }
        let mut from_env: Vec<(&str, &str)> = Vec::new();
        for (name, path, kind) in ENV_MAP {
            let Some(raw) = env(name) else { continue };
            let value = match kind {
                Kind::Str => toml::Value::String(raw),
                Kind::Int => raw
                    .trim()
                    .parse::<i64>()
                    .map(toml::Value::Integer)
                    .map_err(|_| {
                        ConfigError::invalid(*name, format!("expected a whole number, got {raw:?}"))
                    })?,
                Kind::Bool => match raw.trim().to_ascii_lowercase().as_str() {
                    "true" | "1" | "yes" => toml::Value::Boolean(true),
                    "false" | "0" | "no" | "" => toml::Value::Boolean(false),
                    _ => {
                        return Err(ConfigError::invalid(
                            *name,
                            format!("expected true or false, got {raw:?}"),
                        ));
                    }
                },
            };
            set_path(&mut table, path, value);
            from_env.push((name, path));
        }
        let settings: Settings = serde_path_to_error::deserialize(toml::Value::Table(table))
            .map_err(|e| {
                let path = e.path().to_string();
                let setting = from_env
                    .iter()
                    .find(|(_, p)| *p == path)
                    .map(|(name, p)| format!("{name} ({p})"))
                    .or_else(|| env_name(&path).map(|n| format!("{path} (env {n})")))
                    .unwrap_or(path);
                ConfigError::invalid(setting, e.into_inner().to_string())
            })?;
        settings.validate()?;
        Ok(settings)
    }
}

fn parse_table(text: &str, origin: &str) -> Result<toml::Table, ConfigError> {
    text.parse::<toml::Table>().map_err(|e| ConfigError::Parse {
        origin: origin.to_owned(),
        message: e.message().to_owned(),
    })
}

fn merge(base: &mut toml::Table, overlay: toml::Table) {
    for (key, value) in overlay {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(key, v);
            }
        }
    }
}

fn set_path(table: &mut toml::Table, path: &str, value: toml::Value) {
    let mut parts = path.split('.').peekable();
    let mut current = table;
    while let Some(part) = parts.next() {
        if parts.peek().is_none() {
            current.insert(part.to_owned(), value);
            return;
        }
        let entry = current
            .entry(part.to_owned())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        let toml::Value::Table(next) = entry else {
            return;
        };
        current = next;
    }
}
