//go:build tools

// Package tools pins the third-party gRPC clients the tests run against the
// broker. They are built from this module (see the Makefile) rather than with
// `go install pkg@version`, so go.sum pins every dependency.
package tools

import (
	_ "github.com/fullstorydev/grpcurl/cmd/grpcurl"
	_ "github.com/grpc-ecosystem/grpc-health-probe"
)
