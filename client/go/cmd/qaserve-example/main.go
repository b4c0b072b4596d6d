// Command qaserve-example asks a qaserve server the seed question and prints the best answer as one JSON line:
//
//	qaserve-example localhost:50051
//	{"answer": "Paris", "start": 54, "end": 59}
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"log"
	"os"
	"time"

	"google.golang.org/grpc"

	"github.com/qaserve/qaserve/client/go/qaserve"
	qaservev1 "github.com/qaserve/qaserve/client/go/qaserve/v1"
)

func main() {
	if len(os.Args) != 2 {
		log.Fatal("usage: qaserve-example HOST:PORT")
	}
	conn, err := grpc.Dial(os.Args[1], grpc.WithInsecure())
	if err != nil {
		log.Fatal(err)
	}
	defer conn.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	response, err := qaservev1.NewQuestionAnsweringServiceClient(conn).Answer(ctx, &qaservev1.AnswerRequest{
		Question: "What is the capital of France?",
		Context:  "France is a country in Western Europe. Its capital is Paris.",
	})
	if err != nil {
		details := qaserve.Details(err)
		log.Fatalf("Answer failed: %s %s: %s", details.Code, details.Reason, details.Message)
	}
	best := response.GetAnswers()[0]
	text, _ := json.Marshal(best.GetAnswer())
	// start/end count code points, like Python's str; best.GetByteStart()/GetByteEnd() index a Go string.
	fmt.Printf("{\"answer\": %s, \"start\": %d, \"end\": %d}\n", text, best.GetStart(), best.GetEnd())
}
