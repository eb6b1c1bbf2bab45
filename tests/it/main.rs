//! The integration suite: a real streamgate over real HTTP, against a private `redis-server`
//! (and the embedded engine once it exists). One binary, one module per area.

mod helpers;

/// Runs each listed `async fn(TestApp)` once per backend, as `<name>::embedded`,
/// `<name>::redis` and `<name>::cluster` (a Redis Cluster of three masters).
/// `name = "toml"` appends configuration for that test.
macro_rules! on_each_backend {
    ($($test:ident $(= $extra:expr)?),* $(,)?) => {
        $(
            mod $test {
                #[allow(unused_imports)]
                use super::*;

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn embedded() {
                    let extra = String::new() $(+ $extra)?;
                    let app = crate::helpers::TestApp::on_embedded(&extra).await;
                    super::$test(app).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn redis() {
                    let extra = String::new() $(+ $extra)?;
                    let Some(app) = crate::helpers::TestApp::on_redis(&extra).await else { return };
                    super::$test(app).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn cluster() {
                    let extra = String::new() $(+ $extra)?;
                    let Some(app) = crate::helpers::TestApp::on_cluster(&extra).await else { return };
                    super::$test(app).await;
                }
            }
        )*
    };
}

mod admin;
mod auth;
mod broadcast;
mod cli;
mod cluster;
mod conformance;
mod copy;
mod front;
mod groups;

mod health;
mod instances;
mod lifecycle;
mod openapi;
mod ops;
mod produce;
mod seed004;
mod sse_clients;
mod storage;
