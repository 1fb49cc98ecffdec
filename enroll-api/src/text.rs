//! Free text from clients: one check, applied before either store.
//!
//! Token descriptions and label keys and values, an agent revocation's reason,
//! and an enrolling agent's hostname, OS and version are stored, listed,
//! logged and published in events. They must mean the same on every backend
//! and every consumer: PostgreSQL cannot store U+0000 at all, SQLite can, and
//! control characters (line breaks, escape sequences, NUL) forge log lines and
//! terminal output. So every control character (Unicode general category
//! `Cc`: U+0000..=U+001F and U+007F..=U+009F, including tab, CR and LF) is
//! refused, never stripped or escaped silently: the answer is 422
//! `invalid_request` naming the field. Other Unicode is kept as sent.
//!
//! The HTTP handlers check first (for a precise answer); the stores check the
//! same rule again before writing ([`crate::store::StoreError::InvalidText`]),
//! so no path can write what the other backend would refuse.

/// Why a free-text value is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TextError {
    /// Shorter than its minimum or longer than its maximum (in characters).
    #[error("{field} must be {min}..={max} characters")]
    Length {
        /// The field's name.
        field: &'static str,
        /// Minimum characters.
        min: usize,
        /// Maximum characters.
        max: usize,
    },
    /// Holds a control character.
    #[error("{field} must not contain control characters (U+0000..U+001F, U+007F..U+009F)")]
    Control {
        /// The field's name.
        field: &'static str,
    },
}

impl TextError {
    /// The field the error is about.
    pub fn field(&self) -> &'static str {
        match self {
            TextError::Length { field, .. } | TextError::Control { field } => field,
        }
    }
}

/// Checks `value` of `field`: `min..=max` characters, no control character.
pub fn check(field: &'static str, value: &str, min: usize, max: usize) -> Result<(), TextError> {
    if value.chars().any(char::is_control) {
        return Err(TextError::Control { field });
    }
    let n = value.chars().count();
    if n < min || n > max {
        return Err(TextError::Length { field, min, max });
    }
    Ok(())
}

/// Only the control-character rule (for stores, whose length limits are
/// the handlers' business).
pub fn check_no_control(field: &'static str, value: &str) -> Result<(), TextError> {
    if value.chars().any(char::is_control) {
        Err(TextError::Control { field })
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_refused() {
        for bad in [
            "a\u{0}b",
            "line\nbreak",
            "tab\there",
            "\u{7f}",
            "c1\u{85}",
            "\u{1b}[31m",
        ] {
            assert_eq!(
                check("description", bad, 0, 256),
                Err(TextError::Control {
                    field: "description"
                }),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn other_unicode_is_kept_and_lengths_count_characters() {
        check("reason", "Gerät außer Betrieb – 端末", 1, 256).unwrap();
        check("reason", &"é".repeat(256), 1, 256).unwrap();
        assert!(check("reason", &"é".repeat(257), 1, 256).is_err());
        assert!(matches!(
            check("reason", "", 1, 256),
            Err(TextError::Length {
                field: "reason",
                ..
            })
        ));
    }
}
