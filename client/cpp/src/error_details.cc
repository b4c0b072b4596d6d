#include "qaserve/error_details.h"

#include "google/rpc/error_details.pb.h"

namespace qaserve {

ErrorDetails Details(const grpc::Status& status) {
  google::rpc::Status decoded;
  if (status.error_details().empty() || !decoded.ParseFromString(status.error_details())) {
    ErrorDetails details;
    details.code = status.error_code();
    details.message = status.error_message();
    return details;
  }
  return Details(decoded);
}

ErrorDetails Details(const google::rpc::Status& status) {
  ErrorDetails details;
  details.code = static_cast<grpc::StatusCode>(status.code());
  details.message = status.message();
  for (const auto& any : status.details()) {
    google::rpc::ErrorInfo info;
    google::rpc::BadRequest bad_request;
    google::rpc::RetryInfo retry;
    if (any.UnpackTo(&info)) {
      details.reason = info.reason();
    } else if (any.UnpackTo(&bad_request)) {
      for (const auto& violation : bad_request.field_violations()) details.fields.push_back(violation.field());
    } else if (any.UnpackTo(&retry)) {
      const auto& delay = retry.retry_delay();
      details.retry_delay = std::chrono::duration_cast<std::chrono::milliseconds>(
          std::chrono::seconds(delay.seconds()) + std::chrono::nanoseconds(delay.nanos()));
    }
  }
  return details;
}

}  // namespace qaserve
