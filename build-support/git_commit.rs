//! The build script of the webhook and the agent (both Cargo.toml name this file): records the
//! commit the binary is built from, for `multus_eni_build_info{git_commit}`: two builds of one
//! version (a rebuilt tag, a branch) are then told apart on `/metrics`.
//! `git rev-parse --short HEAD` when the source is a checkout; else `MULTUS_ENI_GIT_COMMIT`
//! (the Dockerfile passes it as a build argument: the build context has no `.git`); else
//! `unknown`.

use std::path::Path;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let output = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(output.stdout).ok()?;
    let text = text.trim();
    (output.status.success() && !text.is_empty()).then(|| text.to_owned())
}

fn main() {
    println!("cargo:rerun-if-env-changed=MULTUS_ENI_GIT_COMMIT");
    // Rebuild the label when HEAD moves (a commit, a checkout), not on every build.
    for reference in
        ["HEAD"]
            .into_iter()
            .map(str::to_owned)
            .chain(git(&["symbolic-ref", "-q", "HEAD"]))
    {
        if let Some(path) = git(&["rev-parse", "--git-path", &reference])
            && Path::new(&path).exists()
        {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    let commit = git(&["rev-parse", "--short", "HEAD"])
        .or_else(|| {
            std::env::var("MULTUS_ENI_GIT_COMMIT")
                .ok()
                .map(|c| c.trim().to_owned())
                .filter(|c| !c.is_empty())
        })
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=MULTUS_ENI_GIT_COMMIT={commit}");
}
