-- wrk script for bench/bench.py, sections 2 and 10: POST /appointments/{id}/end, each id of a file once,
-- with the bearer token wrk was given (-H), and bench_report.lua's result line at the end.
--   wrk -t2 -c16 -d4s -s bench/bench_end.lua -H 'Authorization: Bearer ...' http://127.0.0.1:8080 -- ids.txt 2
-- ids.txt holds one open appointment id per line (started in SQL); thread k of n (the second
-- argument, the same as -t) ends lines k, k+n, k+2n ... A thread that runs out starts its share
-- again (repeats: cheaper than a first end); "ids_used" in the result line counts every end sent,
-- and bench.py makes the file longer than any run needs and records any excess as repeats.
dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "") .. "bench_lib.lua")

local body = '{"end_date": "2020-12-01 15:00:00"}'
local ids, headers = {}, nil
next_id, repeats = 1, 0 -- globals: done() reads them through thread:get

function init(args)
    ids = bench.share(args[1], tonumber(args[2]))
    headers = bench.headers({ ["Content-Type"] = "application/json" })
end

function request()
    if bench.verifying() then
        return wrk.format("POST", "/appointments/" .. ids[1] .. "/end", headers, body)
    end
    if next_id > #ids then
        next_id, repeats = 1, repeats + #ids
    end
    local id = ids[next_id]
    next_id = next_id + 1
    return wrk.format("POST", "/appointments/" .. id .. "/end", headers, body)
end

function extra_report()
    local total = 0
    for _, thread in ipairs(bench.threads) do
        total = total + thread:get("repeats") + thread:get("next_id") - 1
    end
    return { ids_used = total }
end

dofile(bench.dir .. "bench_report.lua")
