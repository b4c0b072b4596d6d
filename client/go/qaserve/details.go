// Package qaserve reads the google.rpc.Status details of qaserve's errors. The messages and gRPC stubs are in
// package qaservev1 (github.com/qaserve/qaserve/client/go/qaserve/v1); errors come back as standard gRPC status
// errors, and Details turns one into the fields a caller branches on.
package qaserve

import (
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	spb "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// ErrorDetails is a failed call (or a failed AnswerMany item) as qaserve describes it.
type ErrorDetails struct {
	// Code is the canonical gRPC code: INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED, ...
	Code codes.Code
	// Message is the human-readable description; do not branch on it.
	Message string
	// Reason is the google.rpc.ErrorInfo reason in UPPER_SNAKE_CASE (MODEL_NOT_FOUND, OVERLOADED, ...), stable for
	// programs to branch on; empty when the status carried no ErrorInfo.
	Reason string
	// Fields names the request fields of the google.rpc.BadRequest field violations ("question", "top_k", ...).
	Fields []string
	// RetryDelay is the google.rpc.RetryInfo delay the server asks for before a retry; zero when it gave none.
	RetryDelay time.Duration
}

// Details reads an RPC error's details from its grpc-status-details-bin trailer. An error that is not a gRPC status
// error reads as codes.Unknown with its text as the message.
func Details(err error) ErrorDetails {
	st, _ := status.FromError(err)
	return fromStatus(st)
}

// StatusDetails reads the google.rpc.Status of a failed AnswerMany item (AnswerManyResponse.GetError()).
func StatusDetails(s *spb.Status) ErrorDetails {
	return fromStatus(status.FromProto(s))
}

func fromStatus(st *status.Status) ErrorDetails {
	details := ErrorDetails{Code: st.Code(), Message: st.Message()}
	for _, detail := range st.Details() {
		switch detail := detail.(type) {
		case *errdetails.ErrorInfo:
			details.Reason = detail.GetReason()
		case *errdetails.BadRequest:
			for _, violation := range detail.GetFieldViolations() {
				details.Fields = append(details.Fields, violation.GetField())
			}
		case *errdetails.RetryInfo:
			details.RetryDelay = detail.GetRetryDelay().AsDuration()
		}
	}
	return details
}
