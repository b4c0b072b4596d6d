// Asks a qaserve server the seed question and prints the best answer as one JSON line:
//   qaserve-example localhost:50051
//   {"answer": "Paris", "start": 54, "end": 59}
#include <chrono>
#include <cstdio>
#include <iostream>
#include <string>

#include <grpcpp/grpcpp.h>

#include "qaserve/error_details.h"
#include "qaserve/v1/question_answering.grpc.pb.h"

namespace {

// The text as a JSON string: quotes, backslashes and control characters escaped, UTF-8 passed through.
std::string JsonString(const std::string& text) {
  std::string out = "\"";
  for (unsigned char c : text) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c < 0x20) {
      char escaped[7];
      std::snprintf(escaped, sizeof escaped, "\\u%04x", c);
      out += escaped;
    } else {
      out += static_cast<char>(c);
    }
  }
  return out + "\"";
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: qaserve-example HOST:PORT\n";
    return 2;
  }
  auto stub = qaserve::v1::QuestionAnsweringService::NewStub(
      grpc::CreateChannel(argv[1], grpc::InsecureChannelCredentials()));

  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  qaserve::v1::AnswerRequest request;
  request.set_question("What is the capital of France?");
  request.set_context("France is a country in Western Europe. Its capital is Paris.");
  qaserve::v1::AnswerResponse response;
  grpc::Status status = stub->Answer(&context, request, &response);
  if (!status.ok()) {
    qaserve::ErrorDetails details = qaserve::Details(status);
    std::cerr << "Answer failed: code " << details.code << " " << details.reason << ": " << details.message << "\n";
    return 1;
  }
  // start/end count code points, like Python's str; byte_start()/byte_end() index a std::string.
  const auto& best = response.answers(0);
  std::cout << "{\"answer\": " << JsonString(best.answer()) << ", \"start\": " << best.start()
            << ", \"end\": " << best.end() << "}" << std::endl;
  return 0;
}
