//! The deployment files in `deploy/`: every Kubernetes manifest validates offline against a
//! current Kubernetes (the PyPI package `kubernetes-validate`, which ships the schemas, in a
//! virtualenv under the target directory) and the DaemonSet holds to what the README promises
//! (host network, not privileged, exactly CAP_BPF and CAP_NET_ADMIN each with its reason beside
//! it, the host paths, probes, requests, a rolling update, names that match the other
//! objects); the systemd unit passes `systemd-analyze verify` and its offline security review
//! (where systemd-analyze is installed; this machine may not run systemd as init, so the unit
//! cannot be started here). The sample configurations themselves are parsed by the agent's unit
//! tests (`config::tests::shipped_configs_parse`).

mod ops_support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use anyhow::{Context, Result, bail, ensure};
use ops_support::workspace_root;
use rocks_e2e::util::{TempDir, describe, run_checked};
use serde_json::Value;

/// The validator release, and the Kubernetes version validated against (the newest it ships).
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";
const KUBERNETES_VERSION: &str = "1.37.0";

/// `<target>/tools/kubernetes-validate`, derived from this test executable's path
/// (`<target>/<profile>/deps/<test>`).
fn venv() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let target = exe.ancestors().nth(3).context("target directory")?;
    Ok(target.join("tools").join("kubernetes-validate"))
}

/// Creates the virtualenv with the validator once (later runs reuse it); returns its bin dir.
fn validator() -> Result<PathBuf> {
    static ONCE: Mutex<()> = Mutex::new(());
    let _guard = ONCE.lock().unwrap_or_else(|e| e.into_inner());
    let venv = venv()?;
    let bin = venv.join("bin");
    if bin.join("kubernetes-validate").exists() {
        return Ok(bin);
    }
    let run = |cmd: &mut Command| -> Result<()> {
        let out = cmd.output().with_context(|| format!("cannot run {}", describe(cmd)))?;
        ensure!(
            out.status.success(),
            "{} failed: {}{}",
            describe(cmd),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    run(Command::new("python3").args(["-m", "venv"]).arg(&venv))
        .context("making a Python virtualenv (Debian: apt-get install python3-venv)")?;
    run(Command::new(bin.join("pip")).args(["install", "--quiet", KUBERNETES_VALIDATE]))?;
    Ok(bin)
}

fn manifests() -> Result<Vec<PathBuf>> {
    let dir = workspace_root().join("deploy/kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    ensure!(files.len() >= 5, "manifests in {}: {files:?}", dir.display());
    Ok(files)
}

/// `kubernetes-validate --strict -k VERSION FILES`: (exit code, output).
fn validate(bin: &Path, files: &[PathBuf]) -> Result<(i32, String)> {
    let out = Command::new(bin.join("kubernetes-validate"))
        .args(["--strict", "--kubernetes-version", KUBERNETES_VERSION])
        .args(files)
        .output()?;
    Ok((out.status.code().unwrap_or(-1), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))))
}

/// All YAML documents of the manifests, as JSON (through the validator's own PyYAML).
fn documents(bin: &Path, files: &[PathBuf]) -> Result<Vec<Value>> {
    let mut cmd = Command::new(bin.join("python"));
    cmd.args([
        "-c",
        "import json, sys, yaml\n\
         docs = [d for f in sys.argv[1:] for d in yaml.safe_load_all(open(f)) if d]\n\
         print(json.dumps(docs))",
    ])
    .args(files);
    Ok(serde_json::from_str(&run_checked(&mut cmd)?)?)
}

#[test]
fn kubernetes_manifests_validate_against_a_current_kubernetes() -> Result<()> {
    let bin = validator()?;
    let files = manifests()?;
    let (code, out) = validate(&bin, &files)?;
    eprintln!("{out}");
    assert_eq!(code, 0, "kubernetes-validate failed:\n{out}");
    for f in &files {
        let name = f.display().to_string();
        assert!(
            out.lines().any(|l| l.contains(&name) && l.contains("passed") && l.contains(&format!("version {}", &KUBERNETES_VERSION[..4]))),
            "{name} not reported as passing:\n{out}"
        );
    }

    // The validator does reject a broken manifest (a misspelled field, strict mode).
    let dir = TempDir::new("manifests")?;
    let daemonset = std::fs::read_to_string(workspace_root().join("deploy/kubernetes/04-daemonset.yaml"))?;
    let broken = dir.path().join("broken.yaml");
    std::fs::write(&broken, daemonset.replace("hostNetwork: true", "hostNetwrok: true"))?;
    let (code, out) = validate(&bin, &[broken])?;
    assert_ne!(code, 0, "a misspelled field passed:\n{out}");
    Ok(())
}

fn find<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter().find(|d| d["kind"] == kind).unwrap_or_else(|| panic!("no {kind} in deploy/kubernetes"))
}

#[test]
fn the_daemonset_runs_unprivileged_with_two_capabilities_and_the_host_paths() -> Result<()> {
    let bin = validator()?;
    let docs = documents(&bin, &manifests()?)?;
    for kind in ["Namespace", "ServiceAccount", "Secret", "ConfigMap", "DaemonSet"] {
        let d = find(&docs, kind);
        if kind != "Namespace" {
            assert_eq!(d["metadata"]["namespace"], find(&docs, "Namespace")["metadata"]["name"], "{kind} in the namespace");
        }
    }
    let ds = find(&docs, "DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(ds["spec"]["updateStrategy"]["type"], "RollingUpdate");
    assert_eq!(pod["serviceAccountName"], find(&docs, "ServiceAccount")["metadata"]["name"]);
    assert_eq!(pod["automountServiceAccountToken"], false);
    // The agent stops within 3 s; the kubelet must wait longer before SIGKILL.
    assert!(pod["terminationGracePeriodSeconds"].as_u64().is_some_and(|s| s > 3), "{pod}");
    let containers = pod["containers"].as_array().expect("containers");
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    let sc = &c["securityContext"];
    assert!(!ds.to_string().contains("\"privileged\":true"), "nothing privileged");
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_eq!(sc["capabilities"]["add"], serde_json::json!(["BPF", "NET_ADMIN"]), "exactly what privileges.rs checks");

    // Each added capability has its reason written beside it (a comment right above).
    let text = std::fs::read_to_string(workspace_root().join("deploy/kubernetes/04-daemonset.yaml"))?;
    let lines: Vec<&str> = text.lines().collect();
    for cap in ["BPF", "NET_ADMIN"] {
        let i = lines.iter().position(|l| l.trim() == format!("- {cap}")).unwrap_or_else(|| panic!("no `- {cap}` line"));
        assert!(lines[i - 1].trim_start().starts_with('#'), "no reason above `- {cap}`");
    }

    // Host paths: bpffs and the cgroup2 tree (read-only), mounted at the node's own paths.
    let volumes = pod["volumes"].as_array().expect("volumes");
    let mounts = c["volumeMounts"].as_array().expect("volumeMounts");
    let mount_of = |host_path: &str| -> &Value {
        let v = volumes.iter().find(|v| v["hostPath"]["path"] == host_path).unwrap_or_else(|| panic!("no hostPath {host_path}"));
        mounts.iter().find(|m| m["name"] == v["name"]).unwrap_or_else(|| panic!("{host_path} not mounted"))
    };
    assert_eq!(mount_of("/sys/fs/bpf")["mountPath"], "/sys/fs/bpf");
    assert_eq!(mount_of("/sys/fs/cgroup")["mountPath"], "/sys/fs/cgroup");
    assert_eq!(mount_of("/sys/fs/cgroup")["readOnly"], true);
    let run_dir = mount_of("/run/rocks")["mountPath"].as_str().expect("run dir").to_owned();

    // Probes: the agent's own `status`, against the run directory it really uses.
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(c[probe]["exec"]["command"], serde_json::json!(["/rocks-agent", "status", "--run-dir", run_dir]), "{probe}");
    }
    assert!(c["resources"]["requests"]["cpu"].is_string() && c["resources"]["requests"]["memory"].is_string(), "{c}");

    // The config the args name is the ConfigMap's file; the secret and run dir it names are
    // the mounted ones.
    let args: Vec<&str> = c["args"].as_array().expect("args").iter().filter_map(Value::as_str).collect();
    assert_eq!(args[0], "attach");
    let config_path = args[args.iter().position(|a| *a == "--config").expect("--config") + 1];
    let cm = find(&docs, "ConfigMap");
    let config_volume = volumes.iter().find(|v| v["configMap"]["name"] == cm["metadata"]["name"]).expect("ConfigMap volume");
    let config_mount = mounts.iter().find(|m| m["name"] == config_volume["name"]).expect("ConfigMap mounted");
    let file_name = Path::new(config_path).file_name().unwrap().to_str().unwrap();
    assert_eq!(Path::new(config_path).parent().unwrap(), Path::new(config_mount["mountPath"].as_str().unwrap()));
    let toml = cm["data"][file_name].as_str().unwrap_or_else(|| panic!("ConfigMap has no {file_name}"));
    let value_of = |key: &str| -> String {
        toml.lines()
            .find_map(|l| l.strip_prefix(key).and_then(|r| r.trim_start().strip_prefix('=')))
            .map(|v| v.trim().trim_matches('"').to_owned())
            .unwrap_or_else(|| panic!("no {key} in the ConfigMap's {file_name}"))
    };
    let secret = find(&docs, "Secret");
    let secret_volume = volumes.iter().find(|v| v["secret"]["secretName"] == secret["metadata"]["name"]).expect("Secret volume");
    let secret_mount = mounts.iter().find(|m| m["name"] == secret_volume["name"]).expect("Secret mounted");
    let secret_file = value_of("secret-file");
    let key = Path::new(&secret_file).file_name().unwrap().to_str().unwrap();
    assert_eq!(Path::new(&secret_file).parent().unwrap(), Path::new(secret_mount["mountPath"].as_str().unwrap()));
    assert!(secret["stringData"][key].is_string(), "the Secret has no key {key}");
    assert_eq!(value_of("run-dir"), run_dir);
    let metrics_port: u16 = value_of("metrics").rsplit(':').next().unwrap().parse()?;
    let peer_port: u16 = value_of("listen").rsplit(':').next().unwrap().parse()?;
    let ports: Vec<u64> = c["ports"].as_array().expect("ports").iter().filter_map(|p| p["containerPort"].as_u64()).collect();
    assert!(ports.contains(&metrics_port.into()) && ports.contains(&peer_port.into()), "{ports:?}");
    Ok(())
}

#[test]
fn the_systemd_unit_verifies() -> Result<()> {
    let unit_dir = workspace_root().join("deploy/systemd");
    let unit = std::fs::read_to_string(unit_dir.join("rocks-agent.service"))?;
    // The same two capabilities as the DaemonSet and privileges.rs.
    assert!(unit.lines().any(|l| l == "CapabilityBoundingSet=CAP_BPF CAP_NET_ADMIN"), "{unit}");
    assert!(unit.contains("ExecStart=/usr/local/bin/rocks-agent attach --config /etc/rocks/agent.toml"));

    if rocks_e2e::which("systemd-analyze").is_none() {
        eprintln!("SKIPPED: systemd-analyze is not installed; the unit was not verified");
        return Ok(());
    }
    // verify checks that ExecStart's binary exists: point it at the one just built.
    let dir = TempDir::new("systemd")?;
    let agent = rocks_e2e::agent::agent_bin()?;
    std::fs::write(
        dir.path().join("rocks-agent.service"),
        unit.replace("/usr/local/bin/rocks-agent", &agent.display().to_string()),
    )?;
    std::fs::copy(unit_dir.join("rocks.slice"), dir.path().join("rocks.slice"))?;
    let service = dir.path().join("rocks-agent.service");
    let out = Command::new("systemd-analyze").arg("verify").arg(&service).arg(dir.path().join("rocks.slice")).output()?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && !text.contains("rocks"), "systemd-analyze verify:\n{text}");

    // The offline security review (no running systemd needed): an exposure score of at most
    // 3.0 ("OK" or better) out of 10.
    let out = Command::new("systemd-analyze").args(["security", "--offline=yes", "--no-pager"]).arg(&service).output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let Some(line) = text.lines().find(|l| l.contains("Overall exposure level")) else {
        bail!("systemd-analyze security printed no verdict:\n{text}{}", String::from_utf8_lossy(&out.stderr));
    };
    eprintln!("{line}");
    let score: f64 = line.split(':').nth(1).and_then(|r| r.split_whitespace().next()).context("score")?.parse()?;
    assert!(score <= 3.0, "{line}");
    Ok(())
}
