// The Go client against a real server: QASERVE_TARGET=host:port of a qaserve serving the embedded model
// (tests/clients/test_go.py starts one and runs `make client-go-test`).
package qaserve_test

import (
	"context"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"

	"github.com/qaserve/qaserve/client/go/qaserve"
	qaservev1 "github.com/qaserve/qaserve/client/go/qaserve/v1"
)

const (
	seedQuestion = "What is the capital of France?"
	seedContext  = "France is a country in Western Europe. Its capital is Paris."
	// Code points, UTF-8 bytes and UTF-16 units all differ past the rocket (4 bytes, 1 rune).
	emojiContext = "🚀 Zoë's café in Zürich 🇨🇭 opened in 1998. Its crème brûlée costs 12 francs 🍮, and the chef is José Núñez."
)

var qa qaservev1.QuestionAnsweringServiceClient

func TestMain(m *testing.M) {
	target := os.Getenv("QASERVE_TARGET")
	if target == "" {
		fmt.Fprintln(os.Stderr, "set QASERVE_TARGET=host:port of a running qaserve")
		os.Exit(2)
	}
	conn, err := grpc.Dial(target, grpc.WithInsecure())
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	qa = qaservev1.NewQuestionAnsweringServiceClient(conn)
	code := m.Run()
	conn.Close()
	os.Exit(code)
}

func within(t *testing.T, timeout time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	t.Cleanup(cancel)
	return ctx
}

func int32p(v int32) *int32 { return &v }

// A context of hundreds of windows at max_seq_len 64, so progress shows before the final message. The question is
// new on every call: the server would answer a repeated request from its response cache, in one message.
func longRequest() *qaservev1.AnswerRequest {
	lines := make([]string, 120)
	for i := range lines {
		lines[i] = fmt.Sprintf("Line %d: the river number %d flows into lake %d near the town of Ålesund.", i, i, i%7)
	}
	return &qaservev1.AnswerRequest{
		Question: fmt.Sprintf("Which lake does river 42 flow into? (asked at %d)", time.Now().UnixNano()),
		Context:  strings.Join(lines, " "),
		TopK:     int32p(3), MaxSeqLen: int32p(64), DocStride: int32p(16),
	}
}

// What differs between two calls for the same request: the server's timings and the request id.
func withoutTiming(response *qaservev1.AnswerResponse) *qaservev1.AnswerResponse {
	stripped := proto.Clone(response).(*qaservev1.AnswerResponse)
	stripped.Timing, stripped.RequestId = nil, ""
	return stripped
}

func TestAnswerSeedQuestion(t *testing.T) {
	response, err := qa.Answer(within(t, 30*time.Second), &qaservev1.AnswerRequest{Question: seedQuestion, Context: seedContext})
	if err != nil {
		t.Fatal(err)
	}
	best := response.GetAnswers()[0]
	got := []interface{}{best.GetAnswer(), best.GetStart(), best.GetEnd(), best.GetByteStart(), best.GetByteEnd()}
	want := []interface{}{"Paris", int32(54), int32(59), int32(54), int32(59)}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("answer, start, end, byte_start, byte_end = %v, want %v", got, want)
	}
	if response.GetModel().GetName() == "" || response.GetWindows() != 1 {
		t.Fatalf("model %q, windows %d", response.GetModel().GetName(), response.GetWindows())
	}
}

func TestOffsetsOnEmojiContext(t *testing.T) {
	response, err := qa.Answer(within(t, 30*time.Second), &qaservev1.AnswerRequest{
		Question: "Who is the chef?", Context: emojiContext, TopK: int32p(10),
	})
	if err != nil {
		t.Fatal(err)
	}
	runes := []rune(emojiContext)
	pastEmoji := 0
	for _, a := range response.GetAnswers() {
		// A Go string indexes UTF-8 bytes; a []rune indexes code points.
		if byBytes := emojiContext[a.GetByteStart():a.GetByteEnd()]; byBytes != a.GetAnswer() {
			t.Errorf("bytes [%d:%d] = %q, want %q", a.GetByteStart(), a.GetByteEnd(), byBytes, a.GetAnswer())
		}
		if byRunes := string(runes[a.GetStart():a.GetEnd()]); byRunes != a.GetAnswer() {
			t.Errorf("runes [%d:%d] = %q, want %q", a.GetStart(), a.GetEnd(), byRunes, a.GetAnswer())
		}
		if a.GetStart() > 0 {
			pastEmoji++
			if a.GetByteStart() == a.GetStart() {
				t.Errorf("byte and rune offsets agree (%d) past the rocket", a.GetStart())
			}
		}
	}
	if pastEmoji == 0 {
		t.Fatal("no answer lies past the first emoji")
	}
}

func TestAnswerProgressiveEndsWithAnswersResponse(t *testing.T) {
	ctx := within(t, 60*time.Second)
	request := longRequest()
	stream, err := qa.AnswerProgressive(ctx, &qaservev1.AnswerProgressiveRequest{Request: request})
	if err != nil {
		t.Fatal(err)
	}
	var messages []*qaservev1.AnswerProgressiveResponse
	for {
		message, err := stream.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		messages = append(messages, message)
	}
	unary, err := qa.Answer(ctx, request)
	if err != nil {
		t.Fatal(err)
	}
	final := messages[len(messages)-1].GetFinal()
	if final == nil || !proto.Equal(withoutTiming(final), withoutTiming(unary)) {
		t.Fatalf("final message %v, want Answer's %v", final, unary)
	}
	partials := messages[:len(messages)-1]
	if len(partials) == 0 {
		t.Fatalf("no partial before the final message for %d windows", unary.GetWindows())
	}
	done := int32(0)
	for _, message := range partials {
		partial := message.GetPartial()
		if partial == nil || partial.GetWindowsDone() <= done || partial.GetWindowsTotal() != unary.GetWindows() {
			t.Fatalf("partial %v after %d windows done", partial, done)
		}
		done = partial.GetWindowsDone()
	}
}

func TestAnswerManyEchoesIdsAndFailsOnlyTheBadItem(t *testing.T) {
	stream, err := qa.AnswerMany(within(t, 60*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for i := 0; i < 12; i++ {
		item := &qaservev1.AnswerManyRequest{Id: fmt.Sprintf("q%d", i), Request: &qaservev1.AnswerRequest{
			Question: seedQuestion, Context: seedContext,
		}}
		if i == 5 {
			item = &qaservev1.AnswerManyRequest{Id: "bad", Request: &qaservev1.AnswerRequest{Question: " ", Context: seedContext}}
		}
		ids = append(ids, item.GetId())
		if err := stream.Send(item); err != nil {
			t.Fatal(err)
		}
	}
	if err := stream.CloseSend(); err != nil {
		t.Fatal(err)
	}
	var got []string
	for {
		response, err := stream.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, response.GetId())
		if response.GetId() == "bad" {
			details := qaserve.StatusDetails(response.GetError())
			if details.Code != codes.InvalidArgument || details.Reason != "INVALID_ARGUMENT" ||
				fmt.Sprint(details.Fields) != "[question]" {
				t.Errorf("bad item: %+v", details)
			}
		} else if answers := response.GetResponse().GetAnswers(); len(answers) == 0 || answers[0].GetAnswer() != "Paris" {
			t.Errorf("item %s: %v", response.GetId(), response)
		}
	}
	sort.Strings(ids)
	sort.Strings(got)
	if fmt.Sprint(got) != fmt.Sprint(ids) {
		t.Fatalf("ids %v, want %v", got, ids)
	}
}

func TestDeadlineExceeded(t *testing.T) {
	_, err := qa.Answer(within(t, time.Millisecond), longRequest())
	if details := qaserve.Details(err); details.Code != codes.DeadlineExceeded {
		t.Fatalf("code %s (%v), want DeadlineExceeded", details.Code, err)
	}
}

func TestErrorsCarryReasonAndFields(t *testing.T) {
	ctx := within(t, 30*time.Second)
	_, err := qa.Answer(ctx, &qaservev1.AnswerRequest{Question: "Capital?", Context: seedContext, Model: "no-such-model"})
	if details := qaserve.Details(err); details.Code != codes.NotFound || details.Reason != "MODEL_NOT_FOUND" {
		t.Errorf("unknown model: %+v", details)
	}
	_, err = qa.Answer(ctx, &qaservev1.AnswerRequest{Question: "Capital?", Context: seedContext, TopK: int32p(21)})
	details := qaserve.Details(err)
	if details.Code != codes.InvalidArgument || details.Reason != "INVALID_ARGUMENT" || fmt.Sprint(details.Fields) != "[top_k]" {
		t.Errorf("top_k 21: %+v", details)
	}
}
