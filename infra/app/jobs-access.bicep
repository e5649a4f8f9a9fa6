// What the Functions host needs on its own storage (AzureWebJobsStorage) with an identity-based
// connection, and what lakeguard needs for its queues there. Deployed in the jobs account's
// resource group.

param accountName string

@description('The function app\'s user-assigned identity.')
param principalId string

var roles = loadJsonContent('../roles.json')

// Blob Data Owner: the host keeps its keys (azure-webjobs-secrets), timer schedule monitors and
// singleton locks (blob leases, azure-webjobs-hosts) in blobs; Flex reads the deployment package
// from this account. Queue Data Contributor: the queue triggers and lakeguard's own queue client
// (backup requests, reconcile continuations, -poison). Table Data Contributor: host features that
// keep state in tables (documented as optional; granted so none of them fails at run time).
var grants = [
  roles.storageBlobDataOwner
  roles.storageQueueDataContributor
  roles.storageTableDataContributor
]

resource account 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: accountName
}

resource assignments 'Microsoft.Authorization/roleAssignments@2022-04-01' = [
  for roleId in grants: {
    name: guid(account.id, principalId, roleId)
    scope: account
    properties: {
      roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleId)
      principalId: principalId
      principalType: 'ServicePrincipal'
    }
  }
]
