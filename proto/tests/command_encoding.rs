//! The Raft log holds `Command`s as JSON and lives for years: a member after an upgrade must
//! read every entry an older member wrote. This pins the encoding of every command, and of
//! a log entry written before later fields existed, to files under `tests/fixtures`.
//!
//! A change that fails this test breaks old logs. Add fields with `#[serde(default)]` and
//! variants at the end; if an incompatible change is unavoidable, raise the file format
//! (`starling_control::store::FILE_FORMAT`). Regenerate the pinned file only for an
//! addition: `STARLING_BLESS=1 cargo test -p starling-proto --test command_encoding`.

use starling_proto::{
    AppState, BuildStatus, CaRecord, Command, DeployStep, JoinTokenRecord, NodeOutcome, ReleaseId,
    RepoSpec, RolloutPolicy, Strategy, Wave, WaveTarget,
};

fn every_command() -> Vec<Command> {
    let spec = RepoSpec {
        name: "acme/web".into(),
        url: "https://git.example.com/acme/web.git".into(),
        branch: "main".into(),
        webhook_secret: "s3cret".into(),
        auto_deploy: true,
        max_release_bytes: 4 << 30,
        notify: vec!["https://hooks.example.com/starling".into()],
        notify_secret: "n0tify".into(),
        rollout: RolloutPolicy::default(),
    };
    let sha = "0123456789abcdef0123456789abcdef01234567".to_string();
    vec![
        Command::PutRepo { spec, at: 1 },
        Command::QueueBuild {
            repo: "acme/web".into(),
            sha: sha.clone(),
            trigger: "github".into(),
            delivery: Some("github:d-1".into()),
            force: false,
            at: 2,
        },
        Command::LeaseBuild {
            worker: "w/0".into(),
            ttl_ms: 30_000,
            at: 3,
        },
        Command::Heartbeat {
            build: 1,
            worker: "w/0".into(),
            attempt: 1,
            ttl_ms: 30_000,
            at: 4,
        },
        Command::CompleteBuild {
            build: 1,
            worker: "w/0".into(),
            attempt: 1,
            status: BuildStatus::Succeeded,
            release: Some(ReleaseId::from_bytes([0xab; 32])),
            reason: None,
            at: 5,
        },
        Command::CancelBuild { build: 2, at: 6 },
        Command::ExpireLeases {
            builds: vec![3],
            max_attempts: 3,
            at: 7,
        },
        Command::SetGoal {
            repo: "acme/web".into(),
            env: "default".into(),
            release: ReleaseId::from_bytes([0xab; 32]),
            at: 8,
        },
        Command::CollectReleases {
            releases: vec![ReleaseId::from_bytes([0xcd; 32])],
            keep: 10,
            at: 9,
        },
        Command::Noop,
        Command::Once {
            request: "fwd-1".into(),
            command: Box::new(Command::LeaseBuild {
                worker: "w/1".into(),
                ttl_ms: 30_000,
                at: 10,
            }),
        },
        Command::SetClusterCa {
            ca: CaRecord {
                name: "starling-1".into(),
                cert_pem: "-----BEGIN CERTIFICATE-----".into(),
                key_pem: "-----BEGIN PRIVATE KEY-----".into(),
            },
            at: 11,
        },
        Command::AddJoinToken {
            token: JoinTokenRecord {
                id: "0a1b2c3d".into(),
                secret_sha256: "ab".repeat(32),
                expires_at: 86_400_012,
            },
            at: 12,
        },
        Command::StartDeployment {
            repo: "acme/web".into(),
            env: "default".into(),
            release: ReleaseId::from_bytes([0xab; 32]),
            policy: RolloutPolicy {
                strategy: Strategy::Waves,
                soak_ms: 2_000,
                max_failed_pct: 10,
                wave_timeout_ms: 600_000,
            },
            trigger: "build 1".into(),
            at: 13,
        },
        Command::AdvanceDeployment {
            id: 1,
            step: DeployStep::Plan {
                waves: vec![
                    Wave::new("canary", WaveTarget::Nodes(vec!["eu-1".into()])),
                    Wave::new("eu", WaveTarget::Region("eu".into())),
                    Wave::new("all", WaveTarget::All),
                ],
            },
            at: 14,
        },
        Command::AdvanceDeployment {
            id: 1,
            step: DeployStep::StartWave { wave: 0 },
            at: 15,
        },
        Command::AdvanceDeployment {
            id: 1,
            step: DeployStep::WaveHealthy { wave: 0 },
            at: 16,
        },
        Command::AdvanceDeployment {
            id: 1,
            step: DeployStep::CompleteWave {
                wave: 0,
                outcomes: vec![NodeOutcome {
                    node: "eu-1".into(),
                    region: "eu".into(),
                    release: Some(ReleaseId::from_bytes([0xab; 32])),
                    state: AppState::Running,
                    error: None,
                }],
            },
            at: 17,
        },
        Command::AdvanceDeployment {
            id: 1,
            step: DeployStep::Fail {
                wave: 1,
                reason: "wave eu: 1 of 1 nodes failed".into(),
                outcomes: Vec::new(),
            },
            at: 18,
        },
        Command::AdvanceDeployment {
            id: 1,
            step: DeployStep::Succeed,
            at: 19,
        },
        Command::PauseDeployment {
            id: 1,
            paused: true,
            at: 20,
        },
        Command::MarkNotified { index: 7, at: 21 },
    ]
}

const PINNED: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/commands_v1.json"
);

#[test]
fn every_command_encodes_as_pinned() {
    let now: Vec<serde_json::Value> = every_command()
        .iter()
        .map(|c| serde_json::to_value(c).unwrap())
        .collect();
    let text = serde_json::to_string_pretty(&now).unwrap() + "\n";
    if std::env::var_os("STARLING_BLESS").is_some() {
        std::fs::write(PINNED, &text).unwrap();
    }
    let pinned = std::fs::read_to_string(PINNED).expect("the pinned encoding");
    assert_eq!(
        text, pinned,
        "the encoding of a command changed: old logs would misread"
    );
    // And what is pinned decodes to the same commands.
    let back: Vec<Command> = serde_json::from_str(&pinned).unwrap();
    assert_eq!(back, every_command());
}

/// Members send commands to each other in postcard (Raft RPC), which has no field names:
/// a field skipped when it has its default would shift every field after it.
#[test]
fn every_command_survives_postcard() {
    for cmd in every_command() {
        let bytes = postcard::to_allocvec(&cmd).unwrap();
        let back: Command = postcard::from_bytes(&bytes)
            .unwrap_or_else(|e| panic!("{} does not decode from postcard: {e}", cmd.name()));
        assert_eq!(back, cmd);
    }
}

/// A `PutRepo` written before repositories had a release size limit still reads, with the
/// default limit.
#[test]
fn entries_from_before_later_fields_still_read() {
    let old = r#"{"PutRepo":{"spec":{"name":"acme/web","url":"file:///x","branch":"main","webhook_secret":"s","auto_deploy":true},"at":1}}"#;
    let cmd: Command = serde_json::from_str(old).unwrap();
    let Command::PutRepo { spec, .. } = cmd else {
        panic!("not a PutRepo: {cmd:?}");
    };
    assert_eq!(
        spec.max_release_bytes,
        starling_proto::DEFAULT_MAX_RELEASE_BYTES
    );
}
