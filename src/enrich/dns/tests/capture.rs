//! Opening the capture: configuration errors.

use super::*;

#[test]
fn config_errors() {
    let mut cfg = crate::config::DnsConfig {
        kind: "pcap".into(),
        ..Default::default()
    };
    assert!(matches!(
        DnsCapture::open(&cfg),
        Err(DnsError::UnsupportedType { .. })
    ));
    cfg.kind = "af_packet".into();
    cfg.af_packet.snaplen = 16;
    assert!(matches!(
        DnsCapture::open(&cfg),
        Err(DnsError::Snaplen { .. })
    ));
    cfg.af_packet.snaplen = 1024;
    cfg.af_packet.interface = "no-such-if0".into();
    assert!(matches!(
        DnsCapture::open(&cfg),
        Err(DnsError::Socket { .. })
    ));
    cfg.enabled = false;
    assert!(DnsCapture::open_if_enabled(&cfg).unwrap().is_none());
}
