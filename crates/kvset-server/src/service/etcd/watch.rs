//! etcd's `Watch` service: one bidirectional stream carrying many watches, served by this
//! member's watch hub (the same one kvset.v1 watches use).

use futures::StreamExt;
use kvset_proto::etcdserverpb as epb;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Request;
use tonic::Response;
use tonic::Status;

use super::EtcdService;
use crate::errors::KvError;
use crate::pb::etcd::errors;
use crate::pb::etcd::request;
use crate::pb::etcd::response;
use crate::service::requires_leader;

type WatchStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<epb::WatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl epb::watch_server::Watch for EtcdService {
    type WatchStream = WatchStream;

    async fn watch(
        &self,
        req: Request<tonic::Streaming<epb::WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let require_leader = requires_leader(req.metadata());
        let ctx = crate::forward::CallContext::of(&req);
        let limits = self.member.config().limits.clone();
        let guard = self.member.clone();
        let requests = req.into_inner().filter_map(move |r| {
            let next = match r {
                Ok(msg) => request::watch(msg, &limits).map(|w| Ok(guard.guard_watch(&ctx, w))),
                Err(status) => Some(Err(KvError::request_stream(&status))),
            };
            std::future::ready(next)
        });
        let responses = self.member.watch_hub().open(requests, require_leader);
        let member = self.member.clone();
        let out = ReceiverStream::new(responses)
            .map(move |r| r.map(|r| response::watch(r, &member.header_info())).map_err(errors::from_kv));
        self.member.metrics().grpc("etcd.Watch", tonic::Code::Ok, std::time::Duration::ZERO);
        Ok(Response::new(Box::pin(out)))
    }
}
