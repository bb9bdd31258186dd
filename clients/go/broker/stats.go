package broker

import (
	"maps"
	"time"

	"github.com/mongo-broker/mongo-broker/clients/go/brokerv1"
)

// StatsResult is the broker's version, uptime and each database's figures:
// what Client.Stats and Database.Stats return.
type StatsResult struct {
	Version string
	// Uptime is how long the broker has been serving.
	Uptime    time.Duration
	Databases []DatabaseStats
	// Instance is the replica that answered (the broker's server.instance,
	// by default its host name: the pod name on Kubernetes).
	Instance string
	// Caller is this call's own peer as the broker saw it
	// ("ipv4:10.0.0.7:53412", "unix:").
	Caller string
	// Peers are the calls to this broker by calling host, most recently
	// seen first (at most 64 hosts); empty unless the token may use every
	// configured database.
	Peers []PeerStats
	// PeersDropped counts the hosts dropped from Peers to keep it bounded.
	PeersDropped int64
}

// PeerStats is one calling host of a broker.
type PeerStats struct {
	// Host is "10.0.0.7", "fd00::7", or "unix" for every Unix-socket caller.
	Host  string
	Calls int64
	// LastCallAgo is how long ago the host's last call came.
	LastCallAgo time.Duration
}

// Database returns the figures of the named database, and whether they
// were in the result.
func (r *StatsResult) Database(name string) (DatabaseStats, bool) {
	for _, db := range r.Databases {
		if db.Database == name {
			return db, true
		}
	}
	return DatabaseStats{}, false
}

// DatabaseStats is one database's pool, wait queue, operation and server
// figures, as the broker's Stats call and /metrics report them.
type DatabaseStats struct {
	Database string

	// The connection pool, from the driver's connection monitoring events.
	ConnectionsOpen    int64
	ConnectionsInUse   int64
	ConnectionsIdle    int64
	ConnectionsCreated int64
	ConnectionsClosed  int64
	MaxPoolSize        int64
	PoolClears         int64

	// The broker's wait queue in front of the pool.
	WaitQueueLength int64
	WaitQueueMax    int64
	MaxWaiting      int64
	// Time spent waiting for a connection, over the most recent round trips.
	WaitP50 time.Duration
	WaitP99 time.Duration
	WaitMax time.Duration
	// CheckoutFailures counts calls refused or failed while getting a
	// connection, by reason: queue_full, wait_timeout, and the driver's own.
	CheckoutFailures map[string]int64

	// Operations counts the commands sent to MongoDB, by command name
	// (find, getMore, insert, ...).
	Operations map[string]int64
	// RPCs counts the calls answered, by method (Find, FindOne, Insert, Ping).
	RPCs map[string]int64
	// Errors counts the calls that failed, by gRPC status code name.
	Errors       map[string]int64
	RPCsInFlight int64
	OpenCursors  int64

	// The server, from the driver's heartbeats.
	Available  bool
	ServerType string
	ServerRTT  time.Duration
	LastError  string

	// Pool-size advice from Little's law over the last minute.
	RecommendedMaxPoolSize int64
	// DemandConnections is the peak of connections wanted (busy and
	// waiting), averaged per second.
	DemandConnections   float64
	RoundTripsPerSecond float64
	MeanHold            time.Duration

	// CommandFailures counts the commands that failed, by command name.
	CommandFailures map[string]int64
	// AbandonedRoundTrips counts round trips still running a second past
	// their time limit, answered DEADLINE_EXCEEDED without (should stay 0).
	AbandonedRoundTrips int64
	// StalledStreams counts Find streams ended at their time limit because
	// their client stopped reading.
	StalledStreams int64
	// CoalescedRoundTrips counts round trips that carried more than one
	// waiting call, and CoalescedCalls the calls they carried.
	CoalescedRoundTrips int64
	CoalescedCalls      int64
}

func statsFromProto(resp *brokerv1.StatsResponse) *StatsResult {
	result := &StatsResult{
		Version:      resp.GetVersion(),
		Uptime:       time.Duration(resp.GetUptimeS() * float64(time.Second)),
		Instance:     resp.GetInstance(),
		Caller:       resp.GetCaller(),
		PeersDropped: resp.GetPeersDropped(),
	}
	for _, peer := range resp.GetPeers() {
		result.Peers = append(result.Peers, PeerStats{
			Host:        peer.GetHost(),
			Calls:       peer.GetCalls(),
			LastCallAgo: time.Duration(peer.GetLastCallSAgo() * float64(time.Second)),
		})
	}
	for _, db := range resp.GetDatabases() {
		result.Databases = append(result.Databases, DatabaseStats{
			Database:               db.GetDatabase(),
			ConnectionsOpen:        db.GetConnectionsOpen(),
			ConnectionsInUse:       db.GetConnectionsInUse(),
			ConnectionsIdle:        db.GetConnectionsIdle(),
			ConnectionsCreated:     db.GetConnectionsCreated(),
			ConnectionsClosed:      db.GetConnectionsClosed(),
			MaxPoolSize:            db.GetMaxPoolSize(),
			PoolClears:             db.GetPoolClears(),
			WaitQueueLength:        db.GetWaitQueueLength(),
			WaitQueueMax:           db.GetWaitQueueMax(),
			MaxWaiting:             db.GetMaxWaiting(),
			WaitP50:                milliseconds(db.GetWaitP50Ms()),
			WaitP99:                milliseconds(db.GetWaitP99Ms()),
			WaitMax:                milliseconds(db.GetWaitMaxMs()),
			CheckoutFailures:       counts(db.GetCheckoutFailures()),
			Operations:             counts(db.GetOperations()),
			RPCs:                   counts(db.GetRpcs()),
			Errors:                 counts(db.GetErrors()),
			RPCsInFlight:           db.GetRpcsInFlight(),
			OpenCursors:            db.GetOpenCursors(),
			Available:              db.GetAvailable(),
			ServerType:             db.GetServerType(),
			ServerRTT:              milliseconds(db.GetServerRttMs()),
			LastError:              db.GetLastError(),
			RecommendedMaxPoolSize: db.GetRecommendedMaxPoolSize(),
			DemandConnections:      db.GetDemandConnections(),
			RoundTripsPerSecond:    db.GetRoundTripsPerSecond(),
			MeanHold:               milliseconds(db.GetMeanHoldMs()),
			CommandFailures:        counts(db.GetCommandFailures()),
			AbandonedRoundTrips:    db.GetAbandonedRoundTrips(),
			StalledStreams:         db.GetStalledStreams(),
			CoalescedRoundTrips:    db.GetCoalescedRoundTrips(),
			CoalescedCalls:         db.GetCoalescedCalls(),
		})
	}
	return result
}

// counts copies a proto map into one the result owns, empty rather than nil
// when the broker sent no entries.
func counts(m map[string]int64) map[string]int64 {
	out := make(map[string]int64, len(m))
	maps.Copy(out, m)
	return out
}
