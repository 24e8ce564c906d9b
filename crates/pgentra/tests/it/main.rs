//! pgentra against the emulator: each module one concern, gated on the driver features it
//! needs (CI builds with `--all-features`, so every module runs there).

#[cfg(all(
    feature = "tokio-postgres-0_7",
    feature = "postgres-0_19",
    feature = "deadpool-postgres-0_14",
    feature = "bb8-0_9",
    feature = "r2d2-0_8",
    feature = "sqlx-0_9",
    feature = "sea-orm-2",
    feature = "diesel-async-0_9",
    feature = "diesel-2"
))]
mod drivers;
#[cfg(all(feature = "deadpool-postgres-0_14", feature = "bb8-0_9"))]
mod faults;
mod no_token_leaks;
#[cfg(all(
    feature = "postgres-0_19",
    feature = "deadpool-postgres-0_14",
    feature = "bb8-0_9",
    feature = "r2d2-0_8"
))]
mod samples;
