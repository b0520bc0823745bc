use super::*;

#[test]
fn defaults_are_the_documented_ones() {
    let config = Settings::default().validate().unwrap();
    assert_eq!(config.http_addr.to_string(), "127.0.0.1:4000");
    assert_eq!(config.data_dir, PathBuf::from("fleetlm-data"));
    assert_eq!(
        config.wal_lanes, None,
        "the data directory's, or DEFAULT_WAL_LANES for a new one"
    );
    assert_eq!(config.flush_interval, Duration::from_millis(300));
}

#[test]
fn flags_win_over_the_file() {
    let flags = Settings {
        wal_lanes: Some(2),
        ..Settings::default()
    };
    let file: Settings = toml::from_str("wal_lanes = 8\nflush_interval_ms = 50").unwrap();
    let config = flags.or(file).validate().unwrap();
    assert_eq!(config.wal_lanes, Some(2));
    assert_eq!(config.flush_interval, Duration::from_millis(50));
}

#[test]
fn open_mode_refuses_a_public_address() {
    let settings = Settings {
        http_addr: Some("0.0.0.0:4000".into()),
        ..Settings::default()
    };
    let error = settings.validate().unwrap_err();
    assert_eq!(error.setting, "http_addr");
}

#[test]
fn origins_default_to_loopback_in_open_mode_and_parse_as_urls() {
    let open = Settings::default().validate().unwrap().allowed_origins;
    assert!(open.allows("http://localhost:3000") && open.allows("http://127.0.0.1:5173"));
    assert!(open.allows("http://[::1]:8080"));
    assert!(!open.allows("https://evil.example") && !open.allows("null"));
    assert!(!open.allows("http://localhost.evil.example"));
    let token = Settings {
        auth_secret: Some("0123456789abcdef".into()),
        ..Settings::default()
    };
    assert!(
        token
            .validate()
            .unwrap()
            .allowed_origins
            .allows("https://anything.example")
    );
    let listed = AllowedOrigins::parse("https://app.example/, loopback").unwrap();
    assert!(listed.allows("https://app.example") && listed.allows("http://localhost"));
    assert!(!listed.allows("https://app.example.evil"));
    let bad = Settings {
        allowed_origins: Some("app.example".into()),
        ..Settings::default()
    };
    assert_eq!(bad.validate().unwrap_err().setting, "allowed_origins");
}

#[test]
fn sizes_take_units_and_addresses_take_localhost() {
    assert_eq!("64MiB".parse::<ByteSize>().unwrap(), ByteSize(64 << 20));
    assert_eq!("4 KiB".parse::<ByteSize>().unwrap(), ByteSize(4096));
    assert_eq!("1GB".parse::<ByteSize>().unwrap(), ByteSize(1_000_000_000));
    assert_eq!("1048576".parse::<ByteSize>().unwrap(), ByteSize(1 << 20));
    assert!("64 parsecs".parse::<ByteSize>().is_err() && "MiB".parse::<ByteSize>().is_err());
    let file: Settings = toml::from_str("wal_segment_bytes = \"64MiB\"\nmax_body_bytes = 2048").unwrap();
    let config = file.validate().unwrap();
    assert_eq!((config.wal_segment_bytes, config.max_body_bytes), (64 << 20, 2048));
    let local = Settings {
        http_addr: Some("localhost:4001".into()),
        ..Settings::default()
    };
    assert_eq!(local.validate().unwrap().http_addr.to_string(), "127.0.0.1:4001");
}

#[test]
fn the_sample_file_is_valid_and_states_the_defaults() {
    let sample: Settings = toml::from_str(include_str!("../../examples/fleetlm.toml")).unwrap();
    let from_sample = format!("{:?}", sample.validate().unwrap());
    assert_eq!(from_sample, format!("{:?}", Settings::default().validate().unwrap()));
}

#[test]
fn toml_errors_name_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fleetlm.toml");
    std::fs::write(&path, "wal_lanes = 2\nshards = = 8\n").unwrap();
    let error = Settings::from_file(&path).unwrap_err().to_string();
    assert!(error.contains("line 2"), "{error}");
}

#[test]
fn cluster_settings_are_validated_together() {
    let cluster = |peers: &str| Settings {
        node_id: Some(2),
        cluster_peers: Some(peers.into()),
        cluster_secret: Some("a-secret-of-sixteen+".into()),
        database_url: Some("postgres://db/fleetlm".into()),
        ..Settings::default()
    };
    let config = cluster("1=127.0.0.1:4101, 2=localhost:4102,3=10.0.0.3:4103")
        .validate()
        .unwrap();
    let node = config.cluster.expect("cluster mode");
    assert_eq!(node.node_id, 2);
    assert_eq!(node.peers.len(), 3);
    assert_eq!(node.peer_listen_addr.to_string(), "127.0.0.1:4102");
    assert_eq!(node.election_timeout, Duration::from_millis(500));
    assert_eq!(node.leader_balance_every, Some(Duration::from_secs(5)));
    assert!(!format!("{node:?}").contains("sixteen"), "the secret is never printed");
    assert!(Settings::default().validate().unwrap().cluster.is_none());

    let error = |settings: Settings| settings.validate().unwrap_err();
    let e = error(cluster("1=127.0.0.1:4101,2=127.0.0.1:4102"));
    assert_eq!(
        (e.setting, e.reason.as_str()),
        ("cluster_peers", "a cluster has 3 or 5 members, got 2")
    );
    assert_eq!(error(cluster("1=a:1,1=b:2,3=c:3")).reason, "node 1 is listed twice");
    assert_eq!(error(cluster("1=a:1,3=b:2,4=c:3")).setting, "node_id");
    assert_eq!(error(cluster("0=a:1,2=b:2,3=c:3")).setting, "cluster_peers");
    assert_eq!(error(cluster("1=a,2=b:2,3=c:3")).setting, "cluster_peers");
    let no_database = Settings {
        database_url: None,
        ..cluster("1=a:1,2=b:2,3=c:3")
    };
    assert_eq!(error(no_database).setting, "database_url");
    let short_secret = Settings {
        cluster_secret: Some("short".into()),
        ..cluster("1=a:1,2=b:2,3=c:3")
    };
    assert_eq!(error(short_secret).setting, "cluster_secret");
    let partial = Settings {
        node_id: Some(1),
        ..Settings::default()
    };
    assert_eq!(error(partial).setting, "cluster_peers");
    let stray = Settings {
        peer_listen_addr: Some("127.0.0.1:4101".into()),
        ..Settings::default()
    };
    assert_eq!(error(stray).setting, "peer_listen_addr");
    let balance = |secs: u64| Settings {
        leader_balance_secs: Some(secs),
        ..cluster("1=127.0.0.1:4101,2=127.0.0.1:4102,3=127.0.0.1:4103")
    };
    let never = balance(0).validate().unwrap().cluster.unwrap();
    assert_eq!(never.leader_balance_every, None, "0 turns balancing off");
    let often = balance(1).validate().unwrap().cluster.unwrap();
    assert_eq!(often.leader_balance_every, Some(Duration::from_secs(1)));
    assert_eq!(
        (error(balance(3601)).setting, error(balance(3601)).reason.as_str()),
        ("leader_balance_secs", "must be between 0 (never) and 3600")
    );
}

#[test]
fn agent_ca_file_must_hold_pem_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let with_file = |path: std::path::PathBuf| Settings {
        agent_ca_file: Some(path),
        ..Settings::default()
    };
    let missing = with_file(dir.path().join("absent.pem")).validate().unwrap_err();
    assert_eq!(missing.setting, "agent_ca_file");
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate").unwrap();
    let error = with_file(garbage).validate().unwrap_err();
    assert_eq!(error.setting, "agent_ca_file", "{error}");
    let key = rcgen::KeyPair::generate().unwrap();
    let ca = rcgen::CertificateParams::new(vec!["ca.test".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let good = dir.path().join("ca.pem");
    std::fs::write(&good, ca.pem()).unwrap();
    assert_eq!(with_file(good).validate().unwrap().agent_ca_certificates.len(), 1);
}

#[test]
fn unknown_file_keys_are_refused() {
    assert!(toml::from_str::<Settings>("wal_lanez = 3").is_err());
}
