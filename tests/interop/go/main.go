// Parses a FinishEvaluationRequest with Go's protobuf runtime (the one the reference Go
// server is built on) under the pre-extension schema, as that server would.
//
// Usage: go run . DESCRIPTOR_HEX REQUEST_HEX
//   DESCRIPTOR_HEX: a serialized FileDescriptorProto of evochi/v1/evochi.proto
//   REQUEST_HEX:    a serialized evochi.v1.FinishEvaluationRequest
//
// Prints JSON: the Evaluation fields the schema knows, the request as protojson (known
// fields only), whether unknown fields were kept, and the request re-serialized with its
// unknown fields dropped (hex).
package main

import (
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protodesc"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"
	"google.golang.org/protobuf/types/descriptorpb"
	"google.golang.org/protobuf/types/dynamicpb"
	_ "google.golang.org/protobuf/types/known/timestamppb"
)

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, format+"\n", args...)
	os.Exit(1)
}

// dropUnknown clears the unknown fields of m and of every message inside it.
func dropUnknown(m protoreflect.Message) bool {
	had := len(m.GetUnknown()) > 0
	m.SetUnknown(nil)
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		switch {
		case fd.IsList() && fd.Message() != nil:
			list := v.List()
			for i := 0; i < list.Len(); i++ {
				had = dropUnknown(list.Get(i).Message()) || had
			}
		case fd.Message() != nil && !fd.IsMap():
			had = dropUnknown(v.Message()) || had
		}
		return true
	})
	return had
}

func main() {
	if len(os.Args) != 3 {
		fail("usage: go run . DESCRIPTOR_HEX REQUEST_HEX")
	}
	raw, err := hex.DecodeString(os.Args[1])
	if err != nil {
		fail("descriptor: %v", err)
	}
	var fdp descriptorpb.FileDescriptorProto
	if err := proto.Unmarshal(raw, &fdp); err != nil {
		fail("descriptor: %v", err)
	}
	file, err := protodesc.NewFile(&fdp, protoregistry.GlobalFiles)
	if err != nil {
		fail("descriptor: %v", err)
	}
	evaluation := file.Messages().ByName("Evaluation")
	var fields []string
	for i := 0; i < evaluation.Fields().Len(); i++ {
		fields = append(fields, string(evaluation.Fields().Get(i).Name()))
	}
	request := dynamicpb.NewMessage(file.Messages().ByName("FinishEvaluationRequest"))
	data, err := hex.DecodeString(os.Args[2])
	if err != nil {
		fail("request: %v", err)
	}
	if err := proto.Unmarshal(data, request); err != nil {
		fail("request: %v", err)
	}
	known, err := protojson.Marshal(request)
	if err != nil {
		fail("protojson: %v", err)
	}
	hadUnknown := dropUnknown(request)
	clean, err := proto.MarshalOptions{Deterministic: true}.Marshal(request)
	if err != nil {
		fail("marshal: %v", err)
	}
	out, _ := json.Marshal(map[string]any{
		"fields":       fields,
		"request":      json.RawMessage(known),
		"had_unknown":  hadUnknown,
		"reserialized": hex.EncodeToString(clean),
	})
	fmt.Println(string(out))
}
