//! `sqlx::migrate!` embeds `migrations/` at compile time, but cargo does not know the macro
//! reads that folder: without this, a new migration file is not embedded until something else
//! in `shared` changes.
fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
