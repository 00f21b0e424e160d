//! Serves synthetic flows on 127.0.0.1:50051 (or the address given as the
//! first argument) and a Unix socket (second argument, optional), to try
//! clients such as grpcurl or `sockscope watch` without the kernel side.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sockscope::config::Config;
use sockscope::export::status::EmptyStatus;
use sockscope::export::{self as export, HealthHandle, ServerOptions};
use sockscope::model::{
    Creds, Endpoint, FlowDirection, FlowRecord, Loss, LossSource, Output, ProcessInfo, Transport,
};

/// Synthetic flows per second.
const RATE_HZ: u64 = 5;
/// A fake loss notice every this many flows.
const LOSS_EVERY: u64 = 20;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let mut cfg = Config::default();
    cfg.server.listen = args.next().unwrap_or_else(|| "127.0.0.1:50051".into());
    cfg.server.unix_socket = args.next().unwrap_or_default();
    let opts = ServerOptions::from_config(&cfg)?;
    let listeners = export::bind(&opts).await?;
    eprintln!(
        "listening on {:?} {:?}",
        listeners.tcp_addr(),
        listeners.unix_path()
    );
    let (tx, rx) = export::pipeline_channel(1024);
    let health = HealthHandle::new();
    health.set_serving(true);
    tokio::spawn(async move {
        let mut id = 0u64;
        let mut tick = tokio::time::interval(Duration::from_millis(1000 / RATE_HZ));
        loop {
            tick.tick().await;
            id += 1;
            let end = SystemTime::now();
            tx.send(Output::Flow(Arc::new(FlowRecord {
                id,
                is_final: true,
                complete: true,
                transport: if id % 3 == 0 {
                    Transport::Udp
                } else {
                    Transport::Tcp
                },
                direction: FlowDirection::Egress,
                local: Endpoint {
                    ip: "10.0.2.15".parse()?,
                    port: 40000 + (id % 1000) as u16,
                    packets: 5,
                    bytes: 294,
                    domain: None,
                    sequence: None,
                },
                remote: Endpoint {
                    ip: "151.101.66.217".parse()?,
                    port: if id % 3 == 0 { 53 } else { 80 },
                    packets: 5,
                    bytes: 437,
                    domain: Some("elastic.co".into()),
                    sequence: None,
                },
                start: end - Duration::from_millis(31),
                end,
                community_id: "1:jdjL1TkdpF1v1GM0+JxRRp+V7KI=".into(),
                sock: 0xffff_8de2_9d33_7000,
                process: Some(ProcessInfo {
                    pid: 4970,
                    ppid: 1,
                    name: "curl".into(),
                    args: vec!["curl".into(), "http://elastic.co/".into()],
                    executable: "/usr/bin/curl".into(),
                    created: Some(end),
                    creds: Some(Creds {
                        uid: 1000,
                        gid: 1000,
                        euid: 1000,
                        egid: 1000,
                    }),
                    user_name: Some("vagrant".into()),
                    group_name: Some("vagrant".into()),
                    container_id: None,
                    pod_uid: None,
                }),
                accounting: Default::default(),
                pod: None,
                remote_pod: None,
            })));
            if id % LOSS_EVERY == 0 {
                tx.send(Output::Loss(Loss {
                    source: LossSource::KernelRing,
                    cpu: Some(0),
                    count: 3,
                    first: end,
                    last: end,
                }));
            }
        }
        #[allow(unreachable_code)]
        Ok::<(), std::net::AddrParseError>(())
    });
    export::serve(
        listeners,
        opts,
        rx,
        Arc::new(EmptyStatus::default()),
        health,
        async {
            let _ = tokio::signal::ctrl_c().await;
        },
    )
    .await?;
    Ok(())
}
