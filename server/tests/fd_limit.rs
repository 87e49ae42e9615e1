//! At start the server raises its open-file soft limit to the hard limit:
//! every connection is a descriptor, and distributions default the soft limit
//! to 1024. A test binary of its own, since the limit is process-wide.

mod common;

use common::*;
use rlimit::Resource;

#[tokio::test]
async fn binding_raises_the_open_file_soft_limit_to_the_hard_limit() {
    let (_, hard) = Resource::NOFILE.get().unwrap();
    let low = hard.min(1024);
    Resource::NOFILE.set(low / 2, hard).unwrap();
    let _server = start_pubsub(config()).await;
    let (soft, after_hard) = Resource::NOFILE.get().unwrap();
    assert_eq!(after_hard, hard);
    assert_eq!(soft, hard, "soft limit raised from {}", low / 2);
}
