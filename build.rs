// `sqlx::migrate!` embeds the migrations at compile time; without this a new
// migration file would not be noticed until something else changed.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
