//! Checks, for the daemons' unit tests, that an annotated example config
//! (`systemd/*.toml.example`) documents every key the daemon accepts: a key
//! added to a config struct without its paragraph in the example fails the
//! test.

use std::collections::BTreeSet;

/// The field names serde lists in an "unknown field" error, e.g. from
/// `toml::from_str::<FileSettings>("no_such_key = 1")` on a struct with
/// `deny_unknown_fields`: "unknown field `no_such_key`, expected one of
/// `a`, `b`, ...". This is serde's own list of the struct's fields, so it
/// cannot drift from the struct.
pub fn fields_from_unknown_field_error(error: &str) -> BTreeSet<String> {
    let Some((_, expected)) = error.split_once("expected") else {
        return BTreeSet::new();
    };
    expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

/// The keys a config struct with `deny_unknown_fields` accepts, read from
/// serde's own "unknown field" error (see
/// [`fields_from_unknown_field_error`]).
pub fn accepted_keys<T: serde::de::DeserializeOwned + std::fmt::Debug>() -> BTreeSet<String> {
    let error = toml::from_str::<T>("no_such_key = 1")
        .expect_err("a key the config does not know must be refused")
        .to_string();
    fields_from_unknown_field_error(&error)
}

/// Keys an example sets or shows commented out: lines `key = value` or
/// `# key = value` that parse as TOML (so prose in comments is not taken for
/// a key).
pub fn keys_in_example(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim_start();
            let line = line.strip_prefix("# ").unwrap_or(line);
            let table: toml::Table = toml::from_str(line).ok()?;
            let mut keys = table.keys();
            match (keys.next(), keys.next()) {
                (Some(key), None) => Some(key.clone()),
                _ => None,
            }
        })
        .collect()
}

/// The config-file keys a clap command implies: every long flag with `_`
/// for `-`, less `except` (flags that exist only on the command line) and
/// `help`/`version`.
pub fn keys_from_flags(command: &clap::Command, except: &[&str]) -> BTreeSet<String> {
    command
        .get_arguments()
        .filter_map(|a| a.get_long())
        .filter(|l| !["help", "version"].contains(l) && !except.contains(l))
        .map(|l| l.replace('-', "_"))
        .collect()
}

/// Panics unless `example` shows every one of `keys` (set or commented out)
/// and no key outside them, naming what is missing or extra.
pub fn assert_example_documents(example_name: &str, example: &str, keys: &BTreeSet<String>) {
    let shown = keys_in_example(example);
    let missing: Vec<&String> = keys.difference(&shown).collect();
    let extra: Vec<&String> = shown.difference(keys).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{example_name}: keys the daemon accepts but the example does not document: {missing:?}; \
         keys in the example the daemon does not accept: {extra:?}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_serde_field_list_and_example_keys() {
        let err = "unknown field `zz`, expected one of `data_dir`, `log_level` at line 1";
        let fields = fields_from_unknown_field_error(err);
        assert_eq!(
            fields.into_iter().collect::<Vec<_>>(),
            ["data_dir", "log_level"]
        );
        let example = "# comment = prose, not a key\n# Default 3.\nlisten = \"x\"\n# weight = 1\n\n# --- A = B\n";
        let keys = keys_in_example(example);
        assert_eq!(keys.into_iter().collect::<Vec<_>>(), ["listen", "weight"]);
    }

    #[test]
    #[should_panic(expected = "\"weight\"")]
    fn a_missing_key_fails() {
        let keys = ["listen", "weight"].map(String::from).into();
        assert_example_documents("x", "listen = 1\n", &keys);
    }
}
