//! Settings defined once: [`settings!`] makes a struct that is both clap's arguments (a flag,
//! with its environment variable) and a configuration file's schema (the field's name), and
//! merges the two, so a setting is declared, documented and defaulted in one place.

use serde::{Deserialize, Deserializer};
use std::time::Duration;

/// A struct of optional settings, each one field: its doc comment is the `--help` text, its
/// `#[arg]` the flag and variable, its `#[serde]` how a file spells its value. Adds `KEYS` (the
/// names a file may use) and `or` (each setting of `self`, else of the fallback).
macro_rules! settings {
    (
        $(#[$outer:meta])*
        $vis:vis struct $name:ident {
            $( $(#[$meta:meta])* $field:ident : $ty:ty ),* $(,)?
        }
    ) => {
        #[derive(Debug, Clone, Default, clap::Args, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        $(#[$outer])*
        $vis struct $name {
            $( $(#[$meta])* pub(crate) $field: Option<$ty>, )*
        }

        impl $name {
            /// The settings' names in a configuration file.
            pub(crate) const KEYS: &'static [&'static str] = &[$(stringify!($field)),*];

            /// Every setting of `self`, else of `fallback` (flags and variables over a file).
            pub(crate) fn or(self, fallback: Self) -> Self {
                Self { $( $field: self.$field.or(fallback.$field), )* }
            }
        }
    };
}
pub(crate) use settings;

/// A duration in a file, written as for the flags (`30s`, `10m`, `1h`).
pub(crate) fn duration<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Duration>, D::Error> {
    Option::<String>::deserialize(deserializer)?
        .map(|text| humantime::parse_duration(&text).map_err(serde::de::Error::custom))
        .transpose()
}

/// A cloud in a file, by the names `--cloud` takes ([`pgentra::Cloud`]'s `FromStr`).
pub(crate) fn cloud<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<pgentra::Cloud>, D::Error> {
    Option::<String>::deserialize(deserializer)?
        .map(|text| text.parse().map_err(serde::de::Error::custom))
        .transpose()
}

/// The parser of `--cloud`: the names of the known clouds, offered as clap's possible values.
pub(crate) fn cloud_parser() -> impl clap::builder::TypedValueParser<Value = pgentra::Cloud> {
    use clap::builder::TypedValueParser as _;
    let names = pgentra::Cloud::KNOWN
        .iter()
        .filter_map(pgentra::Cloud::name);
    clap::builder::PossibleValuesParser::new(names).try_map(|name| name.parse::<pgentra::Cloud>())
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    settings! {
        /// Two settings.
        pub(crate) struct Example {
            /// A number.
            #[arg(long)]
            count: usize,
            /// A time.
            #[arg(long, value_parser = humantime::parse_duration)]
            #[serde(default, deserialize_with = "super::duration")]
            wait: std::time::Duration,
        }
    }

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        example: Example,
    }

    #[test]
    fn flags_win_over_the_file_and_the_file_fills_the_rest() {
        let flags = Cli::parse_from(["x", "--count", "3"]).example;
        let file: Example = toml::from_str("count = 9\nwait = \"2s\"").unwrap();
        let merged = flags.or(file);
        assert_eq!(merged.count, Some(3));
        assert_eq!(merged.wait, Some(std::time::Duration::from_secs(2)));
        assert_eq!(Example::KEYS, ["count", "wait"]);
    }
}
