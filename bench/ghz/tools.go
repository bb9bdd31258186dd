//go:build tools

// Package tools pins ghz, the third-party gRPC load generator that
// `python -m bench.bench` drives against the broker's TCP listener. It is
// built from this module (`go build -o .tools/bin/ghz github.com/bojand/ghz/cmd/ghz`)
// rather than with `go install pkg@version`, so go.sum pins every dependency
// and the build does not depend on the proxy answering deprecation queries.
package tools

import (
	_ "github.com/bojand/ghz/cmd/ghz"
)
