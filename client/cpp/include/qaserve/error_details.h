// qaserve's error details: the google.rpc.Status that a failed call carries in its grpc-status-details-bin trailer
// (grpc::Status::error_details()) or that a failed AnswerMany item carries in its `error`.
#pragma once

#include <chrono>
#include <string>
#include <vector>

#include <grpcpp/support/status.h>

#include "google/rpc/status.pb.h"

namespace qaserve {

// A failed call or AnswerMany item as qaserve describes it.
struct ErrorDetails {
  // The canonical gRPC code: INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED, ...
  grpc::StatusCode code = grpc::StatusCode::OK;
  // The human-readable description; do not branch on it.
  std::string message;
  // The google.rpc.ErrorInfo reason in UPPER_SNAKE_CASE (MODEL_NOT_FOUND, OVERLOADED, ...); empty without one.
  std::string reason;
  // The request fields named by the google.rpc.BadRequest field violations ("question", "top_k", ...).
  std::vector<std::string> fields;
  // The google.rpc.RetryInfo delay the server asks for before a retry; zero when it gave none.
  std::chrono::milliseconds retry_delay{0};
};

// Reads a failed call's details from its trailer; a status without details gives its code and message alone.
ErrorDetails Details(const grpc::Status& status);

// Reads the google.rpc.Status of a failed AnswerMany item (AnswerManyResponse::error()).
ErrorDetails Details(const google::rpc::Status& status);

}  // namespace qaserve
