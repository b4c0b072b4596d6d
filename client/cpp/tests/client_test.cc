// The C++ client against a real server: QASERVE_TARGET=host:port of a qaserve serving the embedded model
// (tests/clients/test_cpp.py starts one and runs this binary).
#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include <google/protobuf/util/message_differencer.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include "qaserve/error_details.h"
#include "qaserve/v1/question_answering.grpc.pb.h"

namespace {

using qaserve::v1::AnswerRequest;
using qaserve::v1::AnswerResponse;

const char kSeedQuestion[] = "What is the capital of France?";
const char kSeedContext[] = "France is a country in Western Europe. Its capital is Paris.";
// UTF-8 bytes and code points differ past the rocket (4 bytes, 1 code point).
const char kEmojiContext[] =
    "🚀 Zoë's café in Zürich 🇨🇭 opened in 1998. Its crème brûlée costs 12 francs 🍮, and the chef is José Núñez.";

std::unique_ptr<qaserve::v1::QuestionAnsweringService::Stub> Stub() {
  const char* target = std::getenv("QASERVE_TARGET");
  if (target == nullptr) {
    ADD_FAILURE() << "set QASERVE_TARGET=host:port of a running qaserve";
    std::exit(2);
  }
  return qaserve::v1::QuestionAnsweringService::NewStub(
      grpc::CreateChannel(target, grpc::InsecureChannelCredentials()));
}

void SetTimeout(grpc::ClientContext* context, std::chrono::milliseconds timeout) {
  context->set_deadline(std::chrono::system_clock::now() + timeout);
}

// A context of many windows at max_seq_len 64, so progress shows before the final message. The question is new on
// every call: the server would answer a repeated request from its response cache, in one message.
AnswerRequest LongRequest() {
  std::string context;
  for (int i = 0; i < 120; ++i) {
    context += "Line " + std::to_string(i) + ": the river number " + std::to_string(i) + " flows into lake " +
               std::to_string(i % 7) + " near the town of Ålesund. ";
  }
  AnswerRequest request;
  request.set_question("Which lake does river 42 flow into? (asked at " +
                       std::to_string(std::chrono::steady_clock::now().time_since_epoch().count()) + ")");
  request.set_context(context);
  request.set_top_k(3);
  request.set_max_seq_len(64);
  request.set_doc_stride(16);
  return request;
}

// What differs between two calls for the same request: the server's timings and the request id.
AnswerResponse WithoutTiming(AnswerResponse response) {
  response.clear_timing();
  response.clear_request_id();
  return response;
}

TEST(Answer, SeedQuestion) {
  auto stub = Stub();
  grpc::ClientContext context;
  SetTimeout(&context, std::chrono::seconds(30));
  AnswerRequest request;
  request.set_question(kSeedQuestion);
  request.set_context(kSeedContext);
  AnswerResponse response;
  ASSERT_TRUE(stub->Answer(&context, request, &response).ok());
  const auto& best = response.answers(0);
  EXPECT_EQ(best.answer(), "Paris");
  EXPECT_EQ(best.start(), 54);
  EXPECT_EQ(best.end(), 59);
  EXPECT_EQ(best.byte_start(), 54);
  EXPECT_EQ(best.byte_end(), 59);
  EXPECT_EQ(response.windows(), 1);
}

TEST(Answer, ByteOffsetsSliceAStdStringPastAnEmoji) {
  auto stub = Stub();
  grpc::ClientContext context;
  SetTimeout(&context, std::chrono::seconds(30));
  AnswerRequest request;
  request.set_question("Who is the chef?");
  request.set_context(kEmojiContext);
  request.set_top_k(10);
  AnswerResponse response;
  ASSERT_TRUE(stub->Answer(&context, request, &response).ok());
  const std::string text = kEmojiContext;
  int past_emoji = 0;
  for (const auto& a : response.answers()) {
    EXPECT_EQ(text.substr(a.byte_start(), a.byte_end() - a.byte_start()), a.answer());
    if (a.start() > 0) {
      ++past_emoji;
      EXPECT_NE(a.byte_start(), a.start()) << "byte and code point offsets agree past the rocket";
    }
  }
  EXPECT_GT(past_emoji, 0);
}

TEST(AnswerProgressive, PartialsThenAFinalEqualToAnswer) {
  auto stub = Stub();
  const AnswerRequest request = LongRequest();
  qaserve::v1::AnswerProgressiveRequest progressive;
  *progressive.mutable_request() = request;
  grpc::ClientContext stream_context;
  SetTimeout(&stream_context, std::chrono::seconds(60));
  auto reader = stub->AnswerProgressive(&stream_context, progressive);
  std::vector<qaserve::v1::AnswerProgressiveResponse> messages;
  for (qaserve::v1::AnswerProgressiveResponse message; reader->Read(&message);) messages.push_back(message);
  ASSERT_TRUE(reader->Finish().ok());

  grpc::ClientContext context;
  SetTimeout(&context, std::chrono::seconds(60));
  AnswerResponse unary;
  ASSERT_TRUE(stub->Answer(&context, request, &unary).ok());

  ASSERT_GE(messages.size(), 2u) << "a long context reports progress before the final message";
  ASSERT_TRUE(messages.back().has_final());
  EXPECT_TRUE(google::protobuf::util::MessageDifferencer::Equals(WithoutTiming(messages.back().final()),
                                                                 WithoutTiming(unary)));
  int done = 0;
  for (size_t i = 0; i + 1 < messages.size(); ++i) {
    ASSERT_TRUE(messages[i].has_partial());
    EXPECT_GT(messages[i].partial().windows_done(), done);
    EXPECT_EQ(messages[i].partial().windows_total(), unary.windows());
    done = messages[i].partial().windows_done();
  }
}

TEST(AnswerMany, IdsEchoedAndOnlyTheBadItemFails) {
  auto stub = Stub();
  grpc::ClientContext context;
  SetTimeout(&context, std::chrono::seconds(60));
  auto stream = stub->AnswerMany(&context);
  std::vector<std::string> sent;
  for (int i = 0; i < 12; ++i) {
    qaserve::v1::AnswerManyRequest item;
    item.set_id(i == 5 ? "bad" : "q" + std::to_string(i));
    item.mutable_request()->set_question(i == 5 ? " " : kSeedQuestion);
    item.mutable_request()->set_context(kSeedContext);
    sent.push_back(item.id());
    ASSERT_TRUE(stream->Write(item));
  }
  ASSERT_TRUE(stream->WritesDone());
  std::vector<std::string> received;
  for (qaserve::v1::AnswerManyResponse response; stream->Read(&response);) {
    received.push_back(response.id());
    if (response.id() == "bad") {
      ASSERT_TRUE(response.has_error());
      qaserve::ErrorDetails details = qaserve::Details(response.error());
      EXPECT_EQ(details.code, grpc::StatusCode::INVALID_ARGUMENT);
      EXPECT_EQ(details.reason, "INVALID_ARGUMENT");
      EXPECT_EQ(details.fields, std::vector<std::string>{"question"});
    } else {
      ASSERT_TRUE(response.has_response()) << response.id();
      EXPECT_EQ(response.response().answers(0).answer(), "Paris");
    }
  }
  ASSERT_TRUE(stream->Finish().ok());
  std::sort(sent.begin(), sent.end());
  std::sort(received.begin(), received.end());
  EXPECT_EQ(received, sent);
}

TEST(Errors, DeadlineExceeded) {
  auto stub = Stub();
  grpc::ClientContext context;
  SetTimeout(&context, std::chrono::milliseconds(1));
  AnswerResponse response;
  grpc::Status status = stub->Answer(&context, LongRequest(), &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
}

TEST(Errors, ReasonAndFieldsFromTheTrailer) {
  auto stub = Stub();
  AnswerRequest request;
  request.set_question("Capital?");
  request.set_context(kSeedContext);
  request.set_model("no-such-model");
  AnswerResponse response;
  {
    grpc::ClientContext context;
    SetTimeout(&context, std::chrono::seconds(30));
    qaserve::ErrorDetails details = qaserve::Details(stub->Answer(&context, request, &response));
    EXPECT_EQ(details.code, grpc::StatusCode::NOT_FOUND);
    EXPECT_EQ(details.reason, "MODEL_NOT_FOUND");
  }
  request.clear_model();
  request.set_top_k(21);
  grpc::ClientContext context;
  SetTimeout(&context, std::chrono::seconds(30));
  qaserve::ErrorDetails details = qaserve::Details(stub->Answer(&context, request, &response));
  EXPECT_EQ(details.code, grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(details.reason, "INVALID_ARGUMENT");
  EXPECT_EQ(details.fields, std::vector<std::string>{"top_k"});
}

}  // namespace
