package broker

// A tier of replicas without a broker: the address list is checked, and
// in-test gRPC servers with the standard health service show that calls
// go round-robin to the SERVING replicas only, and that a call a replica
// refuses with UNAVAILABLE is retried on another one. (A replica that
// turns NOT_SERVING while it still serves is what a broker does only with
// a drain delay; tests/test_tier_polyglot.py drives real ones.)

import (
	"context"
	"fmt"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"github.com/mongo-broker/mongo-broker/clients/go/brokerv1"
)

func TestParseAddressesAcceptsIPsAndSockets(t *testing.T) {
	got, err := parseAddresses([]string{" 10.0.0.5:50051", "[fd00::5]:50051", "127.0.0.1:1 "})
	if err != nil {
		t.Fatal(err)
	}
	want := []tierAddress{{addr: "10.0.0.5:50051"}, {addr: "[fd00::5]:50051"}, {addr: "127.0.0.1:1"}}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("got %v, want %v", got, want)
	}
	got, err = parseAddresses([]string{"unix:///run/a.sock", "unix:/run/b.sock", "/run/c.sock"})
	if err != nil {
		t.Fatal(err)
	}
	for i, path := range []string{"/run/a.sock", "/run/b.sock", "/run/c.sock"} {
		if got[i] != (tierAddress{addr: path, unix: true}) {
			t.Errorf("address %d: got %v, want the socket %s", i, got[i], path)
		}
	}
}

func TestParseAddressesRefusesWithAFix(t *testing.T) {
	cases := map[string][]string{
		"no addresses":                {},
		"address 2 of 2 is empty":     {"10.0.0.5:50051", " "},
		"has no port":                 {"10.0.0.5"},
		"is not a number":             {"10.0.0.5:http"},
		"from 1 to 65535":             {"10.0.0.5:70000"},
		`NewClient("dns:///broker-0`:  {"broker-0.broker:50051"},
		"is listed twice":             {"10.0.0.5:50051", "10.0.0.5:50051"},
		"mix a unix socket":           {"unix:///run/a.sock", "10.0.0.5:50051"},
		"not dns: targets":            {"dns:///broker:50051"},
		"needs an absolute path":      {"unix://relative/a.sock"},
		"a list takes IP addresses":   {"localhost:50051"},
		"10.0.0.5:50051 or [fd00::5]": {"fd00::5"},
	}
	for want, addresses := range cases {
		_, err := parseAddresses(addresses)
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("parseAddresses(%q) = %v; want an error saying %q", addresses, err, want)
		}
		if _, err := NewClientForAddresses(addresses); err == nil {
			t.Errorf("NewClientForAddresses(%q) accepted it", addresses)
		}
	}
}

func TestNewClientChecksDNSTargets(t *testing.T) {
	for _, bad := range []string{"dns:///broker.apps.svc", "dns:///:50051", "dns:///broker:0"} {
		if _, err := NewClient(bad); err == nil || !strings.Contains(err.Error(), "broker") {
			t.Errorf("NewClient(%q) = %v; want a refusal", bad, err)
		}
	}
	for _, good := range []string{"dns:///broker.apps.svc:50051", "dns://10.96.0.10/broker.apps.svc:50051"} {
		client, err := NewClient(good)
		if err != nil {
			t.Errorf("NewClient(%q): %v", good, err)
			continue
		}
		_ = client.Close()
	}
}

// healthService is a health service of the test's own, not grpc-go's
// health.Server: importing google.golang.org/grpc/health here would turn on
// client-side health checking in this test binary whether or not the
// package does it.
type healthService struct {
	healthpb.UnimplementedHealthServer
	mu      sync.Mutex
	status  healthpb.HealthCheckResponse_ServingStatus
	changed chan struct{} // closed and replaced at every change
}

func newHealthService() *healthService {
	return &healthService{status: healthpb.HealthCheckResponse_SERVING, changed: make(chan struct{})}
}

func (h *healthService) set(status healthpb.HealthCheckResponse_ServingStatus) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.status = status
	close(h.changed)
	h.changed = make(chan struct{})
}

// Watch answers for the service "broker.v1.Broker" only, as a broker
// would for it; every other name is SERVICE_UNKNOWN.
func (h *healthService) Watch(request *healthpb.HealthCheckRequest, stream healthpb.Health_WatchServer) error {
	for {
		h.mu.Lock()
		status, changed := h.status, h.changed
		h.mu.Unlock()
		if request.GetService() != brokerv1.Broker_ServiceDesc.ServiceName {
			status = healthpb.HealthCheckResponse_SERVICE_UNKNOWN
		}
		if err := stream.Send(&healthpb.HealthCheckResponse{Status: status}); err != nil {
			return err
		}
		select {
		case <-changed:
		case <-stream.Context().Done():
			return nil
		}
	}
}

// replica is one in-test broker replica: a Ping that counts its calls (and
// refuses them UNAVAILABLE SHUTTING_DOWN while draining), and the health
// service.
type replica struct {
	brokerv1.UnimplementedBrokerServer
	address string
	health  *healthService

	mu         sync.Mutex
	pings      int
	draining   bool
	cancelNext int // Pings answered CANCELLED, as a stopping gRPC server does
}

func (r *replica) Ping(context.Context, *brokerv1.PingRequest) (*brokerv1.PingResponse, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.pings++
	if r.cancelNext > 0 {
		r.cancelNext--
		return nil, status.Error(codes.Canceled, "CANCELLED")
	}
	if r.draining {
		st, err := status.New(codes.Unavailable, "the broker is shutting down").WithDetails(
			&errdetails.ErrorInfo{Reason: "SHUTTING_DOWN", Domain: Domain})
		if err != nil {
			return nil, err
		}
		return nil, st.Err()
	}
	return &brokerv1.PingResponse{Version: r.address}, nil
}

func (r *replica) count() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.pings
}

func (r *replica) setServing(serving bool) {
	state := healthpb.HealthCheckResponse_SERVING
	if !serving {
		state = healthpb.HealthCheckResponse_NOT_SERVING
	}
	r.health.set(state)
}

// startReplicas starts n replicas, on TCP or on Unix sockets.
func startReplicas(t *testing.T, n int, unix bool) []*replica {
	t.Helper()
	replicas := make([]*replica, n)
	for i := range replicas {
		network, address := "tcp", "127.0.0.1:0"
		if unix {
			network, address = "unix", filepath.Join(t.TempDir(), "broker.sock")
		}
		listener, err := net.Listen(network, address)
		if err != nil {
			t.Fatal(err)
		}
		r := &replica{address: listener.Addr().String(), health: newHealthService()}
		r.setServing(true)
		server := grpc.NewServer()
		brokerv1.RegisterBrokerServer(server, r)
		healthpb.RegisterHealthServer(server, r.health)
		go func() { _ = server.Serve(listener) }()
		t.Cleanup(server.Stop)
		replicas[i] = r
	}
	return replicas
}

func tierClient(t *testing.T, replicas []*replica, opts ...Option) *Client {
	t.Helper()
	addresses := make([]string, len(replicas))
	for i, r := range replicas {
		addresses[i] = r.address
	}
	client, err := NewClientForAddresses(addresses, append([]Option{WithTimeout(10 * time.Second)}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = client.Close() })
	return client
}

// pings makes n Pings, failing the test on any error; it returns how many
// each replica received.
func pings(t *testing.T, client *Client, replicas []*replica, n int) []int {
	t.Helper()
	before := make([]int, len(replicas))
	for i, r := range replicas {
		before[i] = r.count()
	}
	for range n {
		if _, err := client.Ping(context.Background()); err != nil {
			t.Fatalf("Ping: %v", err)
		}
	}
	shares := make([]int, len(replicas))
	for i, r := range replicas {
		shares[i] = r.count() - before[i]
	}
	return shares
}

// eventually repeats check, a batch of calls, until it holds (health
// updates reach the client asynchronously) or 5 s pass.
func eventually(t *testing.T, what string, check func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		ok, seen := check()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("after 5 s, still not %s: %s", what, seen)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestTierSpreadsOverServingReplicasOnly(t *testing.T) {
	for _, unix := range []bool{false, true} {
		t.Run(fmt.Sprintf("unix=%v", unix), func(t *testing.T) {
			replicas := startReplicas(t, 3, unix)
			replicas[2].setServing(false)
			client := tierClient(t, replicas)
			// Until both health checks have answered, one replica takes all.
			eventually(t, "spread over both SERVING replicas", func() (bool, string) {
				shares := pings(t, client, replicas, 30)
				if shares[2] != 0 {
					t.Fatalf("shares %v: the NOT_SERVING replica got calls", shares)
				}
				return shares[0] > 0 && shares[1] > 0, fmt.Sprint(shares)
			})
			// The third comes back, the first goes: the calls follow.
			replicas[2].setServing(true)
			replicas[0].setServing(false)
			eventually(t, "moved off the first replica onto the third", func() (bool, string) {
				shares := pings(t, client, replicas, 30)
				return shares[0] == 0 && shares[1] > 0 && shares[2] > 0, fmt.Sprint(shares)
			})
			if shares := pings(t, client, replicas, 30); shares[0] != 0 {
				t.Fatalf("shares %v: a NOT_SERVING replica got calls", shares)
			}
		})
	}
}

func TestNoServingReplicaIsUnavailable(t *testing.T) {
	replicas := startReplicas(t, 2, false)
	for _, r := range replicas {
		r.setServing(false)
	}
	client := tierClient(t, replicas, WithRetryPolicy(NoRetries))
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err := client.Ping(ctx)
	if !IsUnavailable(err) {
		t.Fatalf("got %v, want UNAVAILABLE (no replica is serving), not a wait for the deadline", err)
	}
	if replicas[0].count()+replicas[1].count() != 0 {
		t.Fatal("a NOT_SERVING replica got a call")
	}
}

func TestRefusedCallIsRetriedOnAnotherReplica(t *testing.T) {
	replicas := startReplicas(t, 2, false)
	client := tierClient(t, replicas)
	// Both connections up first, so that round_robin alternates.
	eventually(t, "spread over both", func() (bool, string) {
		shares := pings(t, client, replicas, 10)
		return shares[0] > 0 && shares[1] > 0, fmt.Sprint(shares)
	})
	replicas[0].mu.Lock()
	replicas[0].draining = true // refuses, but its health still says SERVING
	replicas[0].mu.Unlock()
	retriesBefore := client.RetryCount()
	for i := range 20 {
		response, err := client.Ping(context.Background())
		if err != nil {
			t.Fatalf("Ping %d: %v; want the refusal retried on the other replica", i, err)
		}
		if response.Version != replicas[1].address {
			t.Fatalf("Ping %d answered by %s", i, response.Version)
		}
	}
	if client.RetryCount() == retriesBefore {
		t.Fatal("RetryCount did not grow, yet one replica refused calls")
	}
	// With retries off the refusal is the caller's, and says how many tries
	// (once both connections are up: until then every call goes to one).
	once := tierClient(t, replicas, WithRetryPolicy(NoRetries))
	var refused *Error
	eventually(t, "refused by the draining replica", func() (bool, string) {
		_, err := once.Ping(context.Background())
		refused = AsError(err)
		return refused != nil, "every call answered"
	})
	if refused == nil || refused.Code != codes.Unavailable || refused.Reason != "SHUTTING_DOWN" || refused.Attempts != 1 {
		t.Fatalf("got %v, want the replica's UNAVAILABLE SHUTTING_DOWN after 1 attempt", refused)
	}
	if status.Code(refused) != codes.Unavailable {
		t.Fatal("status.Code does not see UNAVAILABLE")
	}
}

func TestACancelOfTheServersIsRetriedAndTheCallersIsNot(t *testing.T) {
	replicas := startReplicas(t, 1, false)
	replicas[0].mu.Lock()
	replicas[0].cancelNext = 1
	replicas[0].mu.Unlock()
	client := tierClient(t, replicas)
	if _, err := client.Ping(context.Background()); err != nil {
		t.Fatalf("Ping: %v; want the server's CANCELLED retried", err)
	}
	if client.RetryCount() != 1 || replicas[0].count() != 2 {
		t.Fatalf("%d retries, %d pings; want 1 and 2", client.RetryCount(), replicas[0].count())
	}
	canceled := fromRPC(status.Error(codes.Canceled, "context canceled"))
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if shouldRetry(ctx, canceled) {
		t.Fatal("a call whose caller cancelled it would be retried")
	}
	if !shouldRetry(context.Background(), canceled) {
		t.Fatal("a server's CANCELLED would not be retried")
	}
}
