//! Red-team check (attack13): the published package carries what the README points users to.

use std::process::Command;

/// The README (rendered on crates.io, with no `repository` link) sends readers to
/// `RELIABILITY.md` for the fault-injection results; the package must contain every `*.md` file
/// the README names.
#[test]
fn every_markdown_file_the_readme_names_is_in_the_package() {
    let root = env!("CARGO_MANIFEST_DIR");
    let readme = std::fs::read_to_string(format!("{root}/README.md")).unwrap();
    let output = Command::new(env!("CARGO"))
        .args(["package", "--list", "--allow-dirty", "--offline"])
        .current_dir(root)
        .output()
        .expect("cargo package --list");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let listed = String::from_utf8(output.stdout).unwrap();
    let listed: Vec<&str> = listed.lines().collect();
    let mut missing = Vec::new();
    for word in readme.split(|c: char| c == '`' || c.is_whitespace() || c == '(' || c == ')') {
        if let Some(name) = word.strip_suffix(".md")
            && !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            && !listed.contains(&word)
            && !missing.contains(&word)
        {
            missing.push(word);
        }
    }
    assert!(
        missing.is_empty(),
        "README names files the package lacks: {missing:?}"
    );
}
