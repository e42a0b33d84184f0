//! What the suites that talk to Postgres share: a throwaway cluster and their settings from
//! the environment. Each suite uses a part of it.

#![allow(dead_code)]

use std::str::FromStr;

use permd::embedded::{Cluster, ClusterOptions};

/// A throwaway Postgres from the machine's binaries, with `fsync=off` (a benchmark's data
/// is disposable); stopped when dropped.
pub fn cluster() -> Cluster {
    Cluster::start(&ClusterOptions {
        unsafe_fast: true,
        ..ClusterOptions::default()
    })
    .expect("start a throwaway Postgres")
}

/// The environment variable `name`, or `default` when it is unset. A value that does not
/// parse stops the suite with its name rather than quietly running another workload.
pub fn env_or<T: FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(value) => value
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} does not parse")),
        Err(_) => default,
    }
}

/// The comma-separated list in the environment variable `name`, or `default`'s.
pub fn env_list<T: FromStr>(name: &str, default: &str) -> Vec<T> {
    let list = std::env::var(name).unwrap_or_else(|_| default.to_owned());
    list.split(',')
        .map(|item| {
            item.trim()
                .parse()
                .unwrap_or_else(|_| panic!("{name}: {item:?} does not parse"))
        })
        .collect()
}

/// The suite's own runtime (its client, its writers): two worker threads, fixed so that a
/// run on a bigger machine does not give the client more threads than the servers have.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("start a tokio runtime")
}
